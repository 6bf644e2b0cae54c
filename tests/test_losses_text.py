"""Token-level distillation losses for text (issue #13) against values worked out by hand.

Every expected value is written out here from the formula, in plain floats (``math.log`` over
explicit probabilities), never by calling the implementation's building blocks. The logits are
logs of chosen probabilities, so at T = 1 the softmax gives those probabilities back exactly;
at T = 2 ``softmax(log p / 2)`` is ``sqrt(p)`` normalised.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdbench.errors import KdbenchError
from kdbench.losses import (
    hidden_cosine_loss,
    jsd_loss,
    kd_loss,
    minilm_loss,
    reverse_kd_loss,
    skew_kl_loss,
    skew_reverse_kl_loss,
    topk_student_logits,
    topk_teacher_logits,
    tvd_loss,
)
from kdbench.methods import HiddenCosTerm, MiniLMTerm
from kdbench.taps import Outputs

REL = 1e-5

# two token rows, three classes: teacher P, student Q
P = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]
Q = [[0.2, 0.5, 0.3], [0.2, 0.2, 0.6]]


def logits(rows):
    return torch.tensor([[math.log(v) for v in row] for row in rows])


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def mix(w, a, b):
    return [w * x + (1 - w) * y for x, y in zip(a, b, strict=True)]


def tempered(row, temperature):
    """softmax(log p / T) = p^(1/T) / sum p^(1/T)."""
    powered = [v ** (1 / temperature) for v in row]
    return [v / sum(powered) for v in powered]


def mean(values):
    return sum(values) / len(values)


# --------------------------------------------------------------------------------------------
# response losses per token
# --------------------------------------------------------------------------------------------


def test_kd_and_reverse_kd_are_row_means_of_the_per_token_kl():
    # row 1: 0.5 ln(0.5/0.2) + 0.3 ln(0.3/0.5) + 0.2 ln(0.2/0.3) = 0.45815 - 0.15325 - 0.08109
    forward = [
        0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.2 / 0.3),
        0.1 * math.log(0.1 / 0.2) + 0.6 * math.log(0.6 / 0.2) + 0.3 * math.log(0.3 / 0.6),
    ]
    reverse = [
        0.2 * math.log(0.2 / 0.5) + 0.5 * math.log(0.5 / 0.3) + 0.3 * math.log(0.3 / 0.2),
        0.2 * math.log(0.2 / 0.1) + 0.2 * math.log(0.2 / 0.6) + 0.6 * math.log(0.6 / 0.3),
    ]
    s, t = logits(Q), logits(P)
    assert kd_loss(s, t, 1.0).item() == pytest.approx(mean(forward), rel=REL)
    assert reverse_kd_loss(s, t, 1.0).item() == pytest.approx(mean(reverse), rel=REL)


@pytest.mark.parametrize("beta, temperature", [(0.5, 1.0), (0.3, 2.0)])
def test_jsd_is_gkd_divided_by_beta_one_minus_beta(beta, temperature):
    s, t = logits(Q), logits(P)
    expected = []
    for p_row, q_row in zip(P, Q, strict=True):
        p, q = tempered(p_row, temperature), tempered(q_row, temperature)
        m = mix(beta, p, q)  # M = beta P + (1 - beta) Q
        gkd = beta * kl(p, m) + (1 - beta) * kl(q, m)
        expected.append(temperature**2 * gkd / (beta * (1 - beta)))
    got = jsd_loss(s, t, beta=beta, temperature=temperature)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(mean(expected), rel=REL)


def test_jsd_at_one_half_written_out():
    # row 1 at T = 1: M = (0.35, 0.4, 0.25); JSD = 0.5 KL(P||M) + 0.5 KL(Q||M), / 0.25
    kl_pm = 0.5 * math.log(0.5 / 0.35) + 0.3 * math.log(0.3 / 0.4) + 0.2 * math.log(0.2 / 0.25)
    kl_qm = 0.2 * math.log(0.2 / 0.35) + 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.25)
    row1 = (0.5 * kl_pm + 0.5 * kl_qm) / 0.25
    got = jsd_loss(logits(Q[:1]), logits(P[:1]), beta=0.5, temperature=1.0)
    assert got.item() == pytest.approx(row1, rel=REL)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_is_continuous_in_beta_and_ends_at_forward_and_reverse_kl(temperature):
    s, t = logits(Q), logits(P)
    forward = mean(
        [
            temperature**2 * kl(tempered(p, temperature), tempered(q, temperature))
            for p, q in zip(P, Q, strict=True)
        ]
    )
    reverse = mean(
        [
            temperature**2 * kl(tempered(q, temperature), tempered(p, temperature))
            for p, q in zip(P, Q, strict=True)
        ]
    )
    at = {b: jsd_loss(s, t, beta=b, temperature=temperature).item() for b in (0, 1e-4, 1 - 1e-4, 1)}
    assert at[0] == pytest.approx(forward, rel=REL)
    assert at[1] == pytest.approx(reverse, rel=REL)
    assert at[0] == pytest.approx(kd_loss(s, t, temperature).item(), rel=REL)
    assert at[1] == pytest.approx(reverse_kd_loss(s, t, temperature).item(), rel=REL)
    # no jump at the ends (GKD's unscaled JSD would be ~1e-4 times smaller just inside them)
    assert at[1e-4] == pytest.approx(at[0], rel=1e-3)
    assert at[1 - 1e-4] == pytest.approx(at[1], rel=1e-3)
    assert forward != pytest.approx(reverse, rel=1e-2)  # the two ends really differ


def test_skew_kl_and_skew_reverse_kl_by_hand():
    s, t = logits(Q), logits(P)
    # skew KL: KL(P || 0.1 P + 0.9 Q); row 1: M = (0.23, 0.48, 0.29)
    row1 = 0.5 * math.log(0.5 / 0.23) + 0.3 * math.log(0.3 / 0.48) + 0.2 * math.log(0.2 / 0.29)
    row2 = kl(P[1], mix(0.1, P[1], Q[1]))
    assert skew_kl_loss(s, t, alpha=0.1, temperature=1.0).item() == pytest.approx(
        (row1 + row2) / 2, rel=REL
    )
    # skew reverse KL: KL(Q || 0.9 P + 0.1 Q); row 1: M = (0.47, 0.32, 0.21)
    row1 = 0.2 * math.log(0.2 / 0.47) + 0.5 * math.log(0.5 / 0.32) + 0.3 * math.log(0.3 / 0.21)
    row2 = kl(Q[1], mix(0.9, P[1], Q[1]))
    assert skew_reverse_kl_loss(s, t, alpha=0.1, temperature=1.0).item() == pytest.approx(
        (row1 + row2) / 2, rel=REL
    )
    # T^2 scaled at T = 2
    skew_t2 = mean(
        [
            4 * kl(tempered(p, 2), mix(0.1, tempered(p, 2), tempered(q, 2)))
            for p, q in zip(P, Q, strict=True)
        ]
    )
    assert skew_kl_loss(s, t, alpha=0.1, temperature=2.0).item() == pytest.approx(skew_t2, rel=REL)
    # alpha = 0: plain forward / reverse KL; alpha = 1: M = P (resp. Q), 0
    assert skew_kl_loss(s, t, 0.0, 2.0).item() == pytest.approx(kd_loss(s, t, 2.0).item(), rel=REL)
    assert skew_reverse_kl_loss(s, t, 0.0, 2.0).item() == pytest.approx(
        reverse_kd_loss(s, t, 2.0).item(), rel=REL
    )
    assert skew_kl_loss(s, t, 1.0).item() == 0.0
    with pytest.raises(ValueError, match="alpha must be in"):
        skew_kl_loss(s, t, alpha=1.5)


def test_tvd_by_hand_and_not_scaled_by_t_squared():
    s, t = logits(Q), logits(P)
    # row 1: 0.5 (0.3 + 0.2 + 0.1) = 0.3; row 2: 0.5 (0.1 + 0.4 + 0.3) = 0.4
    assert tvd_loss(s, t, 1.0).item() == pytest.approx(0.35, rel=REL)
    at_t2 = mean(
        [
            0.5 * sum(abs(a - b) for a, b in zip(tempered(p, 2), tempered(q, 2), strict=True))
            for p, q in zip(P, Q, strict=True)
        ]
    )
    assert tvd_loss(s, t, 2.0).item() == pytest.approx(at_t2, rel=REL)
    assert at_t2 < 0.35  # softer, smaller, and no factor 4


# --------------------------------------------------------------------------------------------
# hidden-state cosine and MiniLM
# --------------------------------------------------------------------------------------------


def test_hidden_cosine_by_hand_and_masking():
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], requires_grad=True)
    t = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 5.0]]])
    # cos: 1, 0, 1/sqrt(2)
    every = hidden_cosine_loss(s, t, None)
    assert every.item() == pytest.approx((0.0 + 1.0 + 1.0 - 1.0 / math.sqrt(2)) / 3, rel=REL)
    mask = torch.tensor([[True, True, False]])
    masked = hidden_cosine_loss(s, t, mask)
    assert masked.item() == pytest.approx(0.5, rel=REL)
    garbage = s.detach().clone()
    garbage[0, 2] = float("nan")  # a padded token's values change nothing, even NaN
    assert hidden_cosine_loss(garbage, t, mask).item() == pytest.approx(0.5, rel=REL)
    masked.backward()
    assert torch.isfinite(s.grad).all() and s.grad[0, 2].abs().sum() == 0
    assert s.grad[0, 1].abs().sum() > 0


def _causal_rows(rows):
    return torch.tensor(rows).unsqueeze(0)  # 1 x heads x L x L


def test_minilm_attention_transfer_by_hand():
    # two heads, two tokens, causal: row 0 is [1, 0] in both models (the masked key adds 0)
    a_t = _causal_rows([[[1.0, 0.0], [0.25, 0.75]], [[1.0, 0.0], [0.6, 0.4]]])
    a_s = _causal_rows([[[1.0, 0.0], [0.5, 0.5]], [[1.0, 0.0], [0.9, 0.1]]])
    head1 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    head2 = 0.6 * math.log(0.6 / 0.9) + 0.4 * math.log(0.4 / 0.1)
    expected = (0 + head1 + 0 + head2) / (2 * 2)  # mean over heads and query positions
    assert minilm_loss(a_s, a_t, None).item() == pytest.approx(expected, rel=REL)
    with pytest.raises(ValueError, match="2 attention heads and the teacher 1"):
        minilm_loss(a_s, a_t[:, :1], None)


def _minilm_case(length: int):
    """One head; the first two tokens as in the hand computation, a third padding token."""
    a_t = torch.zeros(1, 1, length, length)
    a_s = torch.zeros(1, 1, length, length)
    a_t[0, 0, 0, 0], a_s[0, 0, 0, 0] = 1.0, 1.0
    a_t[0, 0, 1, :2] = torch.tensor([0.25, 0.75])
    a_s[0, 0, 1, :2] = torch.tensor([0.5, 0.5])
    v_t = torch.zeros(1, 1, length, 1)  # d_head 1: scores v_i v_j
    v_t[0, 0, :2, 0] = torch.tensor([1.0, 2.0])
    v_s = torch.zeros(1, 1, length, 4)  # d_head 4: scores v_i . v_j / 2
    v_s[0, 0, 0] = torch.tensor([1.0, 1.0, 1.0, 1.0])
    v_s[0, 0, 1] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    if length == 3:  # the padding token: anything at all
        a_t[0, 0, 2] = torch.tensor([0.2, 0.3, 0.5])
        a_s[0, 0, 2] = torch.tensor([0.6, 0.3, 0.1])
        v_t[0, 0, 2, 0] = 7.0
        v_s[0, 0, 2] = torch.tensor([3.0, -1.0, 2.0, 5.0])
    return a_s, a_t, v_s, v_t


def test_minilm_value_relation_by_hand_and_padding_changes_nothing():
    at = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    # causal value relations, row 1: teacher scores (2, 4) -> (1, e^2) / (1 + e^2); student
    # scores (v1.v0, v1.v1) / sqrt(4) = (0.5, 0.5) -> (0.5, 0.5); row 0: one key, KL 0
    e2 = math.exp(2)
    vr_t = [1 / (1 + e2), e2 / (1 + e2)]
    vr = vr_t[0] * math.log(vr_t[0] / 0.5) + vr_t[1] * math.log(vr_t[1] / 0.5)
    causal = (at + vr) / 2
    # not causal, row 0 also sees key 1: teacher scores (1, 2), student (4/2, 1/2) = (2, 0.5)
    t0 = [1 / (1 + math.e), math.e / (1 + math.e)]
    s0 = [1 / (1 + math.exp(-1.5)), math.exp(-1.5) / (1 + math.exp(-1.5))]
    full = (at + kl(t0, s0) + vr) / 2
    a_s, a_t, v_s, v_t = _minilm_case(2)
    assert minilm_loss(a_s, a_t, None, v_s, v_t).item() == pytest.approx(causal, rel=REL)
    got = minilm_loss(a_s, a_t, None, v_s, v_t, causal=False)
    assert got.item() == pytest.approx(full, rel=REL)

    a_s, a_t, v_s, v_t = _minilm_case(3)
    a_s.requires_grad_(True)
    v_s.requires_grad_(True)
    mask = torch.tensor([[True, True, False]])
    # the mask selects queries (labels that count); keys are every earlier position (causal):
    # a decoder's right padding follows every real query, so it changes nothing
    padded = minilm_loss(a_s, a_t, mask, v_s, v_t)
    assert padded.item() == pytest.approx(causal, rel=REL)
    padded.backward()
    assert torch.isfinite(a_s.grad).all() and torch.isfinite(v_s.grad).all()
    assert a_s.grad[0, 0, 2].abs().sum() == 0 and v_s.grad[0, 0, 2].abs().sum() == 0
    assert a_s.grad[0, 0, 1].abs().sum() > 0 and v_s.grad[0, 0, 1].abs().sum() > 0


# --------------------------------------------------------------------------------------------
# a black-box teacher's top-k tokens
# --------------------------------------------------------------------------------------------


def test_topk_buckets_by_hand():
    t = logits([[0.1, 0.4, 0.2, 0.3]])
    s = logits([[0.25, 0.25, 0.25, 0.25]])
    buckets, index = topk_teacher_logits(t, 2, temperature=1.0)
    assert index.dtype == torch.long and index.tolist() == [[1, 3]]
    # teacher buckets (0.4, 0.3, rest 0.1 + 0.2), student (0.25, 0.25, rest 0.5)
    want = [math.log(0.4), math.log(0.3), math.log(0.3)]
    assert buckets[0].tolist() == pytest.approx(want, rel=REL)
    s_buckets = topk_student_logits(s, index, temperature=1.0)
    assert s_buckets[0].tolist() == pytest.approx([math.log(0.25)] * 2 + [math.log(0.5)], rel=REL)
    expected = kl([0.4, 0.3, 0.3], [0.25, 0.25, 0.5])
    assert kd_loss(s_buckets, buckets, 1.0).item() == pytest.approx(expected, rel=REL)
    # at T = 2 the buckets are T log of the tempered probabilities
    p2 = tempered([0.1, 0.4, 0.2, 0.3], 2)
    buckets2, _ = topk_teacher_logits(t, 2, temperature=2.0)
    want2 = [2 * math.log(p2[1]), 2 * math.log(p2[3]), 2 * math.log(p2[0] + p2[2])]
    assert buckets2[0].tolist() == pytest.approx(want2, rel=REL)


def test_topk_rest_bucket_keeps_a_tiny_missing_mass():
    # top-1 of (20, 0, 0, 0): the rest holds 3 / (e^20 + 3) ~ 6.2e-9, below float32's
    # resolution near 1 (1 - sum would give log 0); its log is ln 3 - 20 - ln(1 + 3 e^-20)
    buckets, _ = topk_teacher_logits(torch.tensor([[20.0, 0.0, 0.0, 0.0]]), 1, 1.0)
    assert buckets[0, 1].item() == pytest.approx(math.log(3) - 20 - math.log1p(3 * math.exp(-20)))
    assert buckets[0, 0].item() == pytest.approx(-math.log1p(3 * math.exp(-20)), abs=1e-6)


def test_topk_with_all_but_one_token_is_the_full_distribution():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 6, generator=g)  # any leading shape
    s = torch.randn(2, 3, 6, generator=g, requires_grad=True)
    buckets, index = topk_teacher_logits(t, 5, temperature=2.0)
    assert buckets.shape == (2, 3, 6) and index.shape == (2, 3, 5)
    s_buckets = topk_student_logits(s, index, temperature=2.0)
    rows = (s_buckets.reshape(6, 6), buckets.reshape(6, 6))
    full = (s.reshape(6, 6), t.reshape(6, 6))
    for loss in (kd_loss, reverse_kd_loss, jsd_loss):
        assert loss(*rows, temperature=2.0).item() == pytest.approx(
            loss(*full, temperature=2.0).item(), rel=1e-4
        )
    # the student's gradient through the buckets is the full one
    (g_buckets,) = torch.autograd.grad(kd_loss(*rows, 2.0), s)
    (g_full,) = torch.autograd.grad(kd_loss(*full, 2.0), s)
    assert torch.allclose(g_buckets, g_full, atol=1e-6)
    assert g_full.abs().sum() > 0
    assert buckets.grad_fn is None  # nothing flows back to the teacher
    with pytest.raises(ValueError, match="k must be in"):
        topk_teacher_logits(t, 6, 1.0)


def test_response_losses_give_the_student_finite_gradients():
    s = logits(Q).requires_grad_(True)
    t = logits(P)
    for loss in (jsd_loss, skew_kl_loss, skew_reverse_kl_loss, tvd_loss):
        (grad,) = torch.autograd.grad(loss(s, t), s)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, loss.__name__
    for beta in (0.0, 1e-6, 1.0):
        (grad,) = torch.autograd.grad(jsd_loss(s, t, beta=beta), s)
        assert torch.isfinite(grad).all()


# --------------------------------------------------------------------------------------------
# the method terms
# --------------------------------------------------------------------------------------------


def test_hidden_cos_term_projects_a_narrower_student_and_masks_padding():
    g = torch.Generator().manual_seed(0)
    student = Outputs(torch.zeros(2, 4, 5), {"hidden": [torch.randn(2, 4, 3, generator=g)] * 2})
    teacher = Outputs(torch.zeros(2, 4, 5), {"hidden": [torch.randn(2, 4, 6, generator=g)]})
    term = HiddenCosTerm(tap="hidden")
    term.build("hidden_cos", student, teacher, "s", "t")
    assert isinstance(term.proj, torch.nn.Linear) and term.proj.bias is None
    assert tuple(term.proj.weight.shape) == (6, 3)
    y = torch.tensor([[1, 2, -1, -2], [3, -2, -2, -2]])  # -2: padding
    value = term(student, teacher, y, 0, None)
    h_s = term.proj(student.features["hidden"][-1])
    h_t = teacher.features["hidden"][-1]
    cos = torch.nn.functional.cosine_similarity(h_s, h_t, dim=-1)
    kept = [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert value.item() == pytest.approx(mean([1 - cos[i, j].item() for i, j in kept]), rel=REL)
    value.backward()
    assert term.proj.weight.grad.abs().sum() > 0
    with pytest.raises(KdbenchError, match="needs the 'final' tap on the student s"):
        HiddenCosTerm().build("hidden_cos", student, teacher, "s", "t")


def test_minilm_term_refuses_different_head_counts_and_uses_values_when_both_have_them():
    a = torch.full((1, 2, 3, 3), 1 / 3)
    v = torch.ones(1, 2, 3, 4)
    both = Outputs(torch.zeros(1, 3, 5), {"attention": [a], "values": [v]})
    no_values = Outputs(torch.zeros(1, 3, 5), {"attention": [a]})
    term = MiniLMTerm()
    term.build("minilm", both, both, "s", "t")
    assert term.use_values
    term.build("minilm", both, no_values, "s", "t")
    assert not term.use_values
    three_heads = Outputs(torch.zeros(1, 3, 5), {"attention": [torch.full((1, 3, 3, 3), 1 / 3)]})
    heads = "student s has 2 heads and the teacher t 3: give the student 3 heads"
    with pytest.raises(KdbenchError, match=heads):
        MiniLMTerm().build("minilm", both, three_heads, "s", "t")
    with pytest.raises(KdbenchError, match="needs the 'attention' tap on the teacher t"):
        MiniLMTerm().build("minilm", both, Outputs(torch.zeros(1, 3, 5), {}), "s", "t")
