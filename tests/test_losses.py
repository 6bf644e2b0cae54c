"""Tests for kdbench.losses against values derived by hand from the formulas in METHODS.md.

Every expected value is computed here from the formula itself (plain-float / numpy loops over
i, j, k in float64) or derived with concrete arithmetic in a comment; none is captured from
running the implementation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdbench import losses
from kdbench.losses import (
    attention_loss,
    attention_map,
    dist_loss,
    dkd_loss,
    fitnet_loss,
    hard_label_loss,
    kd_loss,
    logit_standardize,
    nst_loss,
    pkt_loss,
    reverse_kd_loss,
    rkd_loss,
    sp_loss,
)

REL = 1e-5


# --------------------------------------------------------------------------------------------
# helpers: inputs and plain-float reference formulas
# --------------------------------------------------------------------------------------------


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator) * scale


def rows(x: torch.Tensor) -> list[list[float]]:
    return x.double().tolist()


def softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    scaled = [v / temperature for v in row]
    top = max(scaled)
    exps = [math.exp(v - top) for v in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) = sum_c p_c (log p_c - log q_c)."""
    return sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q, strict=True) if pc > 0)


def smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1.0 else abs(x) - 0.5


def approx(value: float) -> object:
    return pytest.approx(value, rel=REL)


# --------------------------------------------------------------------------------------------
# kd / reverse kd / hard labels
# --------------------------------------------------------------------------------------------


def test_kd_worked_example() -> None:
    # T = 2, B = 2, two classes.
    # sample 0: z_t = [2 ln 3, 0] -> z_t / T = [ln 3, 0] -> p_t = [3/4, 1/4];
    #           z_s = [0, 0]                             -> p_s = [1/2, 1/2].
    #   KL(p_t || p_s) = 3/4 ln(3/4 / 1/2) + 1/4 ln(1/4 / 1/2) = 0.75 ln 1.5 - 0.25 ln 2
    #                  = 0.75 * 0.4054651 - 0.25 * 0.6931472 = 0.3040988 - 0.1732868 = 0.1308120
    # sample 1: identical logits [1, 1] for both -> KL = 0.
    # L = T^2 * (1/B) * (0.1308120 + 0) = 4 * 0.0654060 = 0.2616240
    # (no T^2: 0.0654; sum over the batch: 0.5232; reverse direction: 0.2877)
    teacher = torch.tensor([[2 * math.log(3.0), 0.0], [1.0, 1.0]])
    student = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    expected = 4.0 * (0.75 * math.log(1.5) - 0.25 * math.log(2.0)) / 2.0
    assert expected == pytest.approx(0.2616240, abs=1e-6)
    assert kd_loss(student, teacher, temperature=2.0).item() == approx(expected)


def test_reverse_kd_worked_example() -> None:
    # Same inputs as above, KL(p_s || p_t) instead:
    #   KL = 1/2 ln(1/2 / 3/4) + 1/2 ln(1/2 / 1/4) = 0.5 ln(2/3) + 0.5 ln 2 = 0.5 ln(4/3)
    #      = 0.5 * 0.2876821 = 0.1438410
    # L = 4 * 0.1438410 / 2 = 0.2876821, which differs from the forward KD value 0.2616240.
    teacher = torch.tensor([[2 * math.log(3.0), 0.0], [1.0, 1.0]])
    student = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    expected = 4.0 * 0.5 * math.log(4.0 / 3.0) / 2.0
    assert expected == pytest.approx(0.2876821, abs=1e-6)
    reverse = reverse_kd_loss(student, teacher, temperature=2.0).item()
    assert reverse == approx(expected)
    assert reverse != pytest.approx(kd_loss(student, teacher, temperature=2.0).item(), rel=1e-3)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_matches_loop_formula(temperature: float) -> None:
    student = randn(4, 5, seed=1, scale=2.0)
    teacher = randn(4, 5, seed=2, scale=2.0)
    total = 0.0
    for z_s, z_t in zip(rows(student), rows(teacher), strict=True):
        total += kl(softmax(z_t, temperature), softmax(z_s, temperature))
    expected = temperature**2 * total / 4
    assert kd_loss(student, teacher, temperature).item() == approx(expected)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_reverse_kd_matches_loop_formula(temperature: float) -> None:
    student = randn(3, 4, seed=3, scale=2.0)
    teacher = randn(3, 4, seed=4, scale=2.0)
    total = 0.0
    for z_s, z_t in zip(rows(student), rows(teacher), strict=True):
        total += kl(softmax(z_s, temperature), softmax(z_t, temperature))
    expected = temperature**2 * total / 3
    assert reverse_kd_loss(student, teacher, temperature).item() == approx(expected)


def test_kd_zero_for_identical_logits() -> None:
    logits = randn(4, 5, seed=5, scale=3.0)
    assert kd_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert reverse_kd_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_has_temperature_squared_factor() -> None:
    # KL(softmax(z_t / T) || softmax(z_s / T)) is what kd_loss(z_s / T, z_t / T, 1) computes,
    # so the T^2 factor must be exactly the ratio of the two.
    student = randn(4, 5, seed=6, scale=2.0)
    teacher = randn(4, 5, seed=7, scale=2.0)
    for temperature in (2.0, 4.0, 8.0):
        plain = kd_loss(student / temperature, teacher / temperature, temperature=1.0).item()
        scaled = kd_loss(student, teacher, temperature=temperature).item()
        assert scaled == pytest.approx(temperature**2 * plain, rel=1e-4)


def test_kd_is_a_batch_mean() -> None:
    # Repeating the batch must not change a mean over samples.
    student = randn(3, 4, seed=8)
    teacher = randn(3, 4, seed=9)
    once = kd_loss(student, teacher).item()
    twice = kd_loss(student.repeat(2, 1), teacher.repeat(2, 1)).item()
    assert twice == approx(once)


def test_reverse_kd_differs_from_kd_on_asymmetric_example() -> None:
    student = torch.tensor([[3.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, 1.0, 0.0]])
    forward = kd_loss(student, teacher, temperature=1.0).item()
    reverse = reverse_kd_loss(student, teacher, temperature=1.0).item()
    p_s, p_t = softmax([3.0, 0.0, 0.0]), softmax([0.0, 1.0, 0.0])
    assert forward == approx(kl(p_t, p_s))
    assert reverse == approx(kl(p_s, p_t))
    assert abs(forward - reverse) > 0.1


def test_kd_half_precision_inputs_are_computed_in_float32() -> None:
    student = randn(4, 5, seed=10, scale=2.0).bfloat16()
    teacher = randn(4, 5, seed=11, scale=2.0).bfloat16()
    out = kd_loss(student, teacher)
    assert out.dtype == torch.float32
    total = sum(
        kl(softmax(z_t, 4.0), softmax(z_s, 4.0))
        for z_s, z_t in zip(rows(student.float()), rows(teacher.float()), strict=True)
    )
    assert out.item() == approx(16.0 * total / 4)


def test_hard_label_worked_example() -> None:
    # teacher argmax: sample 0 -> class 1, sample 1 -> class 0.
    # student sample 0 = [0, 0]: softmax = [1/2, 1/2] -> CE = -ln(1/2) = ln 2 = 0.6931472
    # student sample 1 = [ln 3, 0]: softmax = [3/4, 1/4] -> CE(class 0) = -ln(3/4) = 0.2876821
    # mean = (0.6931472 + 0.2876821) / 2 = 0.4904146
    teacher = torch.tensor([[0.1, 5.0], [2.0, -1.0]])
    student = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) + math.log(4.0 / 3.0)) / 2
    assert expected == pytest.approx(0.4904146, abs=1e-6)
    assert hard_label_loss(student, teacher).item() == approx(expected)


def test_hard_label_matches_loop_formula() -> None:
    student = randn(4, 5, seed=12, scale=2.0)
    teacher = randn(4, 5, seed=13, scale=2.0)
    total = 0.0
    for z_s, z_t in zip(rows(student), rows(teacher), strict=True):
        label = max(range(len(z_t)), key=lambda c: z_t[c])
        total += -math.log(softmax(z_s)[label])
    assert hard_label_loss(student, teacher).item() == approx(total / 4)


# --------------------------------------------------------------------------------------------
# dkd
# --------------------------------------------------------------------------------------------


def dkd_reference(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    beta: float,
    temperature: float,
) -> float:
    tckd = nckd = 0.0
    for z_s, z_t, g in zip(rows(student), rows(teacher), target.tolist(), strict=True):
        p_s, p_t = softmax(z_s, temperature), softmax(z_t, temperature)
        b_s, b_t = [p_s[g], 1.0 - p_s[g]], [p_t[g], 1.0 - p_t[g]]
        tckd += kl(b_t, b_s)
        # softmax over the non-target classes = p_c / (1 - p_g) for c != g
        q_s = [p_s[c] / (1.0 - p_s[g]) for c in range(len(z_s)) if c != g]
        q_t = [p_t[c] / (1.0 - p_t[g]) for c in range(len(z_t)) if c != g]
        nckd += kl(q_t, q_s)
    batch = student.shape[0]
    tckd *= temperature**2 / batch
    nckd *= temperature**2 / batch
    return alpha * tckd + beta * nckd


@pytest.mark.parametrize(
    ("alpha", "beta", "temperature"), [(1.0, 8.0, 4.0), (1.0, 0.0, 4.0), (0.0, 1.0, 2.0)]
)
def test_dkd_matches_loop_formula(alpha: float, beta: float, temperature: float) -> None:
    student = randn(4, 5, seed=14, scale=3.0)
    teacher = randn(4, 5, seed=15, scale=3.0)
    target = torch.tensor([0, 3, 4, 3])
    expected = dkd_reference(student, teacher, target, alpha, beta, temperature)
    out = dkd_loss(student, teacher, target, alpha=alpha, beta=beta, temperature=temperature)
    assert out.item() == approx(expected)


def test_dkd_worked_example() -> None:
    # T = 1, B = 1, 3 classes, target g = 0.
    # teacher z = [0, ln 2, 0] -> p_t = [1/4, 1/2, 1/4]; student z = [0, 0, 0] -> p_s = 1/3 each.
    # TCKD = KL([1/4, 3/4] || [1/3, 2/3]) = 1/4 ln(3/4) + 3/4 ln(9/8)
    #      = 0.25 * (-0.2876821) + 0.75 * 0.1177830 = -0.0719205 + 0.0883373 = 0.0164167
    # non-target: q_t = [2/3, 1/3], q_s = [1/2, 1/2]
    # NCKD = 2/3 ln(4/3) + 1/3 ln(2/3) = 0.1917881 - 0.1351550 = 0.0566330
    # L = 1 * TCKD + 8 * NCKD = 0.0164167 + 0.4530643 = 0.4694810
    teacher = torch.tensor([[0.0, math.log(2.0), 0.0]])
    student = torch.zeros(1, 3)
    tckd = 0.25 * math.log(0.75) + 0.75 * math.log(9.0 / 8.0)
    nckd = 2.0 / 3.0 * math.log(4.0 / 3.0) + 1.0 / 3.0 * math.log(2.0 / 3.0)
    expected = tckd + 8.0 * nckd
    assert expected == pytest.approx(0.4694810, abs=1e-6)
    out = dkd_loss(student, teacher, torch.tensor([0]), temperature=1.0)
    assert out.item() == approx(expected)


def test_dkd_tckd_plus_nckd_decomposes_kd() -> None:
    # DKD paper, eq. (5): KD = TCKD + (1 - p_t,g) * NCKD per sample; with B = 1 this is exact.
    student = randn(1, 6, seed=16, scale=2.0)
    teacher = randn(1, 6, seed=17, scale=2.0)
    target = torch.tensor([2])
    p_t_target = softmax(rows(teacher)[0], 4.0)[2]
    tckd = dkd_loss(student, teacher, target, alpha=1.0, beta=0.0).item()
    nckd = dkd_loss(student, teacher, target, alpha=0.0, beta=1.0).item()
    assert tckd + (1.0 - p_t_target) * nckd == pytest.approx(kd_loss(student, teacher).item())


# --------------------------------------------------------------------------------------------
# dist and logit standardisation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("beta", "gamma", "temperature"), [(1.0, 1.0, 4.0), (2.0, 0.5, 1.0)])
def test_dist_matches_numpy_pearson(beta: float, gamma: float, temperature: float) -> None:
    student = randn(4, 5, seed=18, scale=3.0)
    teacher = randn(4, 5, seed=19, scale=3.0)
    y_s = np.array([softmax(r, temperature) for r in rows(student)])
    y_t = np.array([softmax(r, temperature) for r in rows(teacher)])
    inter_rho = [np.corrcoef(y_s[i], y_t[i])[0, 1] for i in range(4)]
    intra_rho = [np.corrcoef(y_s[:, c], y_t[:, c])[0, 1] for c in range(5)]
    inter = 1.0 - float(np.mean(inter_rho))
    intra = 1.0 - float(np.mean(intra_rho))
    expected = temperature**2 * (beta * inter + gamma * intra)
    out = dist_loss(student, teacher, beta=beta, gamma=gamma, temperature=temperature)
    # The 1e-8 in the Pearson denominator shifts the value by ~1e-6 relative at most here.
    assert out.item() == pytest.approx(expected, rel=1e-4)


def test_dist_worked_example() -> None:
    # tau = 1 cannot give easy softmax values for a Pearson example, so take logits whose
    # softmax is a known vector: z = ln(y) gives softmax(z) = y when sum(y) = 1.
    # y_s = [[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]], y_t = [[0.2, 0.3, 0.5], [0.5, 0.3, 0.2]]:
    # rows: centred y_s[0] = [0.1667, -0.0333, -0.1333] and y_t[0] is its reverse
    # [-0.1333, -0.0333, 0.1667]; rho = (-0.02222 + 0.00111 - 0.02222) / 0.04667 = -0.9286
    # (exactly -13/14: centred vectors 1/30 * [5, -1, -4] and 1/30 * [-4, -1, 5],
    #  dot = (-20 + 1 - 20) / 900 = -39/900, norms^2 = 42/900 -> rho = -39/42 = -13/14).
    # Both rows give -13/14 -> inter = 1 + 13/14 = 27/14.
    # columns: y_s[:, 0] = [0.5, 0.2], y_t[:, 0] = [0.2, 0.5] -> rho = -1; column 1 is
    # constant [0.3, 0.3] -> centred vector 0 -> rho = 0 / (0 + 1e-8) = 0; column 2 -> -1.
    # intra = 1 - mean(-1, 0, -1) = 1 + 2/3 = 5/3.
    # L = 1^2 * (27/14 + 5/3) = (81 + 70) / 42 = 151/42 = 3.5952381
    y_s = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]], dtype=torch.float64)
    y_t = torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.3, 0.2]], dtype=torch.float64)
    out = dist_loss(y_s.log(), y_t.log(), temperature=1.0)
    assert out.item() == pytest.approx(151.0 / 42.0, rel=1e-4)


def test_logit_standardize_matches_numpy() -> None:
    logits = randn(3, 5, seed=20, scale=4.0)
    z = logits.double().numpy()
    expected = (z - z.mean(axis=1, keepdims=True)) / (z.std(axis=1, ddof=1, keepdims=True) + 1e-7)
    torch.testing.assert_close(
        logit_standardize(logits), torch.from_numpy(expected).float(), rtol=REL, atol=1e-6
    )


def test_logit_standardize_worked_example() -> None:
    # z = [1, 2, 3]: mean 2, unbiased std = sqrt(((-1)^2 + 0 + 1^2) / 2) = 1 -> [-1, 0, 1]
    # (the biased std would be sqrt(2/3) and give [-1.2247, 0, 1.2247]).
    out = logit_standardize(torch.tensor([[1.0, 2.0, 3.0]]))
    torch.testing.assert_close(out, torch.tensor([[-1.0, 0.0, 1.0]]), rtol=REL, atol=1e-6)


# --------------------------------------------------------------------------------------------
# fitnet
# --------------------------------------------------------------------------------------------


def test_fitnet_worked_example() -> None:
    # differences r - f = [[1, 0], [0, -2]] -> squares [1, 0, 0, 4] -> sum 5, mean 5 / 4 = 1.25
    regressed = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    teacher = torch.tensor([[0.0, 2.0], [3.0, 6.0]])
    assert fitnet_loss(regressed, teacher).item() == approx(1.25)


def test_fitnet_matches_loop_formula() -> None:
    regressed = randn(2, 3, 4, 4, seed=21)
    teacher = randn(2, 3, 4, 4, seed=22)
    r, f = regressed.double().flatten().tolist(), teacher.double().flatten().tolist()
    expected = sum((a - b) ** 2 for a, b in zip(r, f, strict=True)) / len(r)
    assert fitnet_loss(regressed, teacher).item() == approx(expected)


def test_fitnet_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shape"):
        fitnet_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        fitnet_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, 4))


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------


def attention_map_reference(feature: torch.Tensor, p: float = 2.0) -> np.ndarray:
    f = feature.double().numpy()
    batch, channels = f.shape[:2]
    flat = f.reshape(batch, channels, -1)
    out = np.zeros((batch, flat.shape[2]))
    for b in range(batch):
        for s in range(flat.shape[2]):
            out[b, s] = sum(flat[b, c, s] ** p for c in range(channels)) / channels
        norm = math.sqrt(sum(v * v for v in out[b]))
        out[b] /= max(norm, 1e-12)
    return out


def test_attention_worked_example() -> None:
    # student: B = 1, C = 3, 2 x 2 map, flattened positions [p0, p1, p2, p3]:
    #   channel 0 = [1, 2, 0, 0], channel 1 = [1, 0, 0, 0], channel 2 = [-1, 0, 0, 0]
    #   mean over C of f^2 = [(1 + 1 + 1) / 3, 4 / 3, 0, 0] = [1, 4/3, 0, 0]
    #   l2 norm = sqrt(1 + 16/9) = 5/3 -> a_s = [3/5, 4/5, 0, 0] = [0.6, 0.8, 0, 0]
    # teacher: C = 1, f = [0, 0, 0, 3] -> f^2 = [0, 0, 0, 9] -> a_t = [0, 0, 0, 1]
    # (a_s - a_t)^2 = [0.36, 0.64, 0, 1] -> mean = 2 / 4 = 0.5 per stage
    student = torch.tensor([[1.0, 2.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    student = student.reshape(1, 3, 2, 2)
    teacher = torch.tensor([0.0, 0.0, 0.0, 3.0]).reshape(1, 1, 2, 2)
    torch.testing.assert_close(attention_map(student), torch.tensor([[0.6, 0.8, 0.0, 0.0]]))
    torch.testing.assert_close(attention_map(teacher), torch.tensor([[0.0, 0.0, 0.0, 1.0]]))
    assert attention_loss([student], [teacher]).item() == approx(0.5)
    # two stages are summed, not averaged: 0.5 + 0.5 = 1.0
    assert attention_loss([student, student], [teacher, teacher]).item() == approx(1.0)


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (3, 4, 6), (2, 2, 3, 5)])
def test_attention_map_matches_loop_formula(shape: tuple[int, ...]) -> None:
    feature = randn(*shape, seed=23)
    expected = attention_map_reference(feature)
    out = attention_map(feature)
    assert out.shape == (shape[0], math.prod(shape[2:]))
    torch.testing.assert_close(out, torch.from_numpy(expected).float(), rtol=REL, atol=1e-7)


def test_attention_map_with_p_four() -> None:
    feature = randn(2, 3, 3, 3, seed=24)
    expected = attention_map_reference(feature, p=4.0)
    torch.testing.assert_close(
        attention_map(feature, p=4.0), torch.from_numpy(expected).float(), rtol=REL, atol=1e-7
    )


def test_attention_loss_matches_loop_formula() -> None:
    students = [randn(2, 3, 4, 4, seed=25), randn(2, 5, 2, 2, seed=26)]
    teachers = [randn(2, 6, 4, 4, seed=27), randn(2, 4, 2, 2, seed=28)]
    expected = 0.0
    for f_s, f_t in zip(students, teachers, strict=True):
        a_s, a_t = attention_map_reference(f_s), attention_map_reference(f_t)
        expected += float(((a_s - a_t) ** 2).sum() / a_s.size)
    assert attention_loss(students, teachers).item() == approx(expected)


def test_attention_loss_pools_the_larger_map_2d() -> None:
    large = randn(2, 3, 8, 8, seed=29)
    small = randn(2, 4, 4, 4, seed=30)
    # adaptive pooling 8 -> 4 is a plain 2 x 2 average: do it by hand
    pooled = large.reshape(2, 3, 4, 2, 4, 2).mean(dim=(3, 5))
    expected = attention_loss([pooled], [small]).item()
    assert attention_loss([large], [small]).item() == approx(expected)  # student larger
    assert attention_loss([small], [large]).item() == approx(expected)  # teacher larger
    a_p, a_s = attention_map_reference(pooled), attention_map_reference(small)
    assert expected == approx(float(((a_p - a_s) ** 2).mean()))


def test_attention_loss_pools_the_larger_map_1d() -> None:
    large = randn(3, 2, 12, seed=31)
    small = randn(3, 5, 4, seed=32)
    pooled = large.reshape(3, 2, 4, 3).mean(dim=3)  # 12 -> 4: average of 3 neighbours
    a_p, a_s = attention_map_reference(pooled), attention_map_reference(small)
    expected = float(((a_p - a_s) ** 2).mean())
    assert attention_loss([large], [small]).item() == approx(expected)
    assert attention_loss([small], [large]).item() == approx(expected)


def test_attention_loss_invalid_inputs_raise() -> None:
    f = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="student"):
        attention_loss([f, f], [f])
    with pytest.raises(ValueError, match="empty"):
        attention_loss([], [])
    with pytest.raises(ValueError, match="spatial"):
        attention_loss([torch.zeros(2, 3)], [torch.zeros(2, 3)])
    with pytest.raises(ValueError):
        attention_loss([torch.zeros(2, 3, 4)], [torch.zeros(2, 3, 4, 4)])
    with pytest.raises(ValueError, match="spatial"):
        attention_map(torch.zeros(2, 3))


# --------------------------------------------------------------------------------------------
# rkd
# --------------------------------------------------------------------------------------------


@pytest.fixture(params=["kernel", "torch"])
def rkd_form(request, monkeypatch) -> str:
    """Each RKD test runs on both forms: the compiled CPU kernel (kdbench/kernels.py, what a CPU
    run uses) and the PyTorch form (GPUs, MPS, a CPU without numba)."""
    if request.param == "torch":
        monkeypatch.setattr(losses, "_KERNELS", None)
    else:
        assert losses._cpu_kernels() is not None, "numba is a dependency: the kernel must load"
    return request.param


def rkd_reference(
    student: torch.Tensor, teacher: torch.Tensor, w_d: float = 25.0, w_a: float = 50.0
) -> float:
    def distances(e: list[list[float]]) -> list[list[float]]:
        n = len(e)
        d = [[0.0] * n for _ in range(n)]
        for i in range(n):
            for j in range(n):
                if i != j:
                    squared = sum((a - b) ** 2 for a, b in zip(e[i], e[j], strict=True))
                    d[i][j] = math.sqrt(max(squared, 1e-12))
        positive = [v for r in d for v in r if v > 0]
        mean = sum(positive) / len(positive)
        return [[v / mean for v in r] for r in d]

    def unit(e: list[list[float]], i: int, j: int) -> list[float]:
        v = [a - b for a, b in zip(e[i], e[j], strict=True)]
        norm = math.sqrt(sum(x * x for x in v))
        return [x / max(norm, 1e-12) for x in v]

    def angles(e: list[list[float]]) -> list[float]:
        n = len(e)
        out = []
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    u_ij, u_kj = unit(e, i, j), unit(e, k, j)
                    out.append(sum(a * b for a, b in zip(u_ij, u_kj, strict=True)))
        return out

    e_s = rows(student.reshape(student.shape[0], -1))
    e_t = rows(teacher.reshape(teacher.shape[0], -1))
    d_s, d_t = distances(e_s), distances(e_t)
    n = len(e_s)
    loss_d = sum(smooth_l1(d_s[i][j] - d_t[i][j]) for i in range(n) for j in range(n)) / n**2
    psi_s, psi_t = angles(e_s), angles(e_t)
    loss_a = sum(smooth_l1(a - b) for a, b in zip(psi_s, psi_t, strict=True)) / n**3
    return w_d * loss_d + w_a * loss_a


def test_rkd_worked_example_distance_only(rkd_form: str) -> None:
    # 1-D embeddings, same ordering -> every angle term agrees (psi in {-1, 0, 1}): L_A = 0.
    # student e = [0, 1, 3]: d01 = 1, d02 = 3, d12 = 2, mean of positive d = 2
    #   -> normalised d01 = 0.5, d02 = 1.5, d12 = 1.0
    # teacher e = [0, 2, 3]: d01 = 2, d02 = 3, d12 = 1, mean = 2 -> 1.0, 1.5, 0.5
    # differences 0.5, 0, 0.5 -> smooth L1 = 0.5 * 0.25 = 0.125, 0, 0.125; every pair appears
    # twice in the 3 x 3 matrix (diagonal 0): sum = 0.5, mean over 9 entries -> L_D = 1/18.
    # L = 25 * 1/18 + 50 * 0 = 25/18 = 1.3888889
    # (no normalisation: raw diffs 1, 0, 1 -> 2 * 1.0 / 9 * 25 = 5.556)
    student = torch.tensor([[0.0], [1.0], [3.0]])
    teacher = torch.tensor([[0.0], [2.0], [3.0]])
    assert rkd_loss(student, teacher).item() == approx(25.0 / 18.0)
    assert rkd_loss(student, teacher, distance_weight=1.0, angle_weight=0.0).item() == approx(
        1.0 / 18.0
    )


def test_rkd_worked_example_distance_and_angle(rkd_form: str) -> None:
    # student e = [0, 1, 3] -> normalised d01 = 0.5, d02 = 1.5, d12 = 1 (see above)
    # teacher e = [0, 3, 1]: d01 = 3, d02 = 1, d12 = 2, mean 2 -> 1.5, 0.5, 1
    # differences 1, 1, 0 -> smooth L1(1) = 1 - 0.5 = 0.5 each; twice each pair:
    #   sum = 2 * (0.5 + 0.5) = 2 over 9 entries -> L_D = 2/9
    # angles in 1-D: u_ij = sign(e_i - e_j) (0 on the diagonal); psi_ijk = u_ij * u_kj.
    # Student and teacher differ only in u_12 and u_21 (student e1 < e2, teacher e1 > e2).
    #   j = 0: column (u_00, u_10, u_20) = (0, 1, 1) on both sides -> no difference
    #   j = 1: (u_01, u_11, u_21) = (-1, 0, 1) vs (-1, 0, -1) -> psi_012, psi_210 differ (-1 vs 1)
    #   j = 2: (u_02, u_12, u_22) = (-1, -1, 0) vs (-1, 1, 0) -> psi_021, psi_120 differ (1 vs -1)
    # 4 entries differ by 2 -> smooth L1 = 2 - 0.5 = 1.5 each: sum 6 over 27 -> L_A = 2/9
    # L = 25 * 2/9 + 50 * 2/9 = 150/9 = 16.6666667
    student = torch.tensor([[0.0], [1.0], [3.0]])
    teacher = torch.tensor([[0.0], [3.0], [1.0]])
    assert rkd_loss(student, teacher).item() == approx(150.0 / 9.0)
    assert rkd_loss(student, teacher, distance_weight=0.0, angle_weight=1.0).item() == approx(
        2.0 / 9.0
    )


@pytest.mark.parametrize(("batch", "dim"), [(3, 4), (4, 5), (4, 1)])
def test_rkd_matches_loop_formula(batch: int, dim: int, rkd_form: str) -> None:
    student = randn(batch, dim, seed=33)
    teacher = randn(batch, dim, seed=34, scale=2.0)
    assert rkd_loss(student, teacher).item() == approx(rkd_reference(student, teacher))


def test_rkd_flattens_trailing_dims(rkd_form: str) -> None:
    student = randn(4, 2, 3, seed=35)
    teacher = randn(4, 6, seed=36)
    expected = rkd_reference(student.reshape(4, 6), teacher)
    assert rkd_loss(student, teacher).item() == approx(expected)


def test_rkd_is_scale_invariant(rkd_form: str) -> None:
    student = randn(4, 5, seed=37)
    teacher = randn(4, 5, seed=38)
    base = rkd_loss(student, teacher).item()
    assert base > 0.1
    assert rkd_loss(7.5 * student, teacher).item() == approx(base)
    assert rkd_loss(student, 0.2 * teacher).item() == approx(base)


def test_rkd_does_not_backpropagate_into_teacher(rkd_form: str) -> None:
    student = randn(4, 5, seed=39).requires_grad_()
    teacher = randn(4, 5, seed=40).requires_grad_()
    rkd_loss(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0


def rkd_direct(
    student: torch.Tensor, teacher: torch.Tensor, w_d: float = 25.0, w_a: float = 50.0
) -> torch.Tensor:
    """The direct O(B^3 D) form of METHODS.md in float64: differences e_i - e_j, normalised by
    max(norm, 1e-12) (F.normalize), then every <u_ij, u_kj>; differentiable in the student."""

    def relations(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = e.double().reshape(e.shape[0], -1)
        diff = e.unsqueeze(0) - e.unsqueeze(1)  # diff[j, i] = e_i - e_j
        d = diff.pow(2).sum(dim=2).clamp(min=1e-12).sqrt()
        d = d.masked_fill(torch.eye(e.shape[0], dtype=torch.bool), 0.0)
        d = d / d[d > 0].mean()
        unit = F.normalize(diff, p=2.0, dim=2, eps=1e-12)
        return d, torch.bmm(unit, unit.transpose(1, 2))  # [j, i, k] = <u_ij, u_kj>

    d_s, psi_s = relations(student)
    with torch.no_grad():
        d_t, psi_t = relations(teacher)
    return w_d * F.smooth_l1_loss(d_s, d_t) + w_a * F.smooth_l1_loss(psi_s, psi_t)


def test_rkd_worked_example_right_angles(rkd_form: str) -> None:
    # 2-D, 3 samples. Student (0,0), (1,0), (0,1); teacher (0,0), (1,0), (1,1).
    # Angles psi_ijk = <u_ij, u_kj> at anchor j; entries with i = j or k = j are 0 and
    # psi_iji = 1 on both sides, so only i != k, both != j, can differ (each twice: ijk, kji):
    #   j = 0: student u_10 = (1,0), u_20 = (0,1): psi = 0; teacher u_20 = (1,1)/sqrt2: 1/sqrt2
    #   j = 1: student u_01 = (-1,0), u_21 = (-1,1)/sqrt2: 1/sqrt2; teacher u_21 = (0,1): 0
    #   j = 2: student u_02 = (0,-1), u_12 = (1,-1)/sqrt2: 1/sqrt2; teacher u_02 = (-1,-1)/sqrt2,
    #          u_12 = (0,-1): 1/sqrt2 -> equal
    #   4 entries differ by 1/sqrt2 < 1: smooth L1 = 0.5 * 0.5 = 0.25 each; L_A = 1 / 27
    # Distances: student d01 = 1, d02 = 1, d12 = sqrt2; teacher d01 = 1, d02 = sqrt2, d12 = 1;
    #   both means m = (2 + sqrt2) / 3; pairs 02 and 12 differ by x = (sqrt2 - 1) / m
    #   (= 0.3639610), 4 entries of 9: L_D = 4 * 0.5 * x^2 / 9 = 0.0294373
    student = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    x = (math.sqrt(2.0) - 1.0) / ((2.0 + math.sqrt(2.0)) / 3.0)
    loss_d, loss_a = 2.0 * x * x / 9.0, 1.0 / 27.0
    assert loss_d == pytest.approx(0.0294373, rel=1e-5)
    assert rkd_loss(student, teacher, 0.0, 1.0).item() == approx(loss_a)
    assert rkd_loss(student, teacher, 1.0, 0.0).item() == approx(loss_d)
    assert rkd_loss(student, teacher).item() == approx(25.0 * loss_d + 50.0 * loss_a)


def _rkd_against_direct(student: torch.Tensor, teacher: torch.Tensor, grad_rel: float) -> None:
    ours = student.clone().requires_grad_()
    value = rkd_loss(ours, teacher)
    value.backward()
    ref = student.double().requires_grad_()
    expected = rkd_direct(ref, teacher)
    expected.backward()
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected.item(), rel=2e-6)
    scale = ref.grad.abs().max().item()
    assert scale > 0
    assert (ours.grad.double() - ref.grad).abs().max().item() <= grad_rel * scale


@pytest.mark.parametrize("dim", [100, 256])
def test_rkd_gram_form_matches_direct_form_batch_128(dim: int, rkd_form: str) -> None:
    # realistic: B = 128, post-ReLU embeddings with a large common offset (the Gram form centres
    # them; uncentred float32 Gram entries of ~1e4 would lose the differences)
    student = torch.relu(randn(128, dim, seed=70)) * 3.0 + 50.0
    teacher = torch.relu(randn(128, 128, seed=71)) + 100.0
    _rkd_against_direct(student, teacher, grad_rel=1e-5)


def test_rkd_near_duplicate_embeddings_match_direct_form(rkd_form: str) -> None:
    # pairs 1e-3 and 1e-5 apart (relative to a spread of 1): their angles are still resolved
    student, teacher = randn(16, 32, seed=72), randn(16, 32, seed=73)
    student[1] = student[0] + 1e-3 * randn(32, seed=74)
    student[2] = student[0] + 1e-5 * randn(32, seed=75)
    teacher[3] = teacher[4] + 1e-4 * randn(32, seed=76)
    _rkd_against_direct(student, teacher, grad_rel=1e-4)


def test_rkd_exact_duplicates_give_zero_angles(rkd_form: str) -> None:
    # e_1 = e_0 exactly: u_01 = u_10 = 0, so every angle with that pair is 0 (as the direct
    # form's F.normalize gives); the value matches and the gradient stays finite
    student, teacher = randn(12, 8, seed=77), randn(12, 8, seed=78)
    student[1] = student[0]
    teacher[5] = teacher[6]
    ours = student.clone().requires_grad_()
    value = rkd_loss(ours, teacher)
    value.backward()
    assert value.item() == pytest.approx(rkd_direct(student, teacher).item(), rel=2e-6)
    assert torch.isfinite(ours.grad).all()


def test_rkd_kernel_and_torch_forms_agree_in_every_mode(monkeypatch) -> None:
    # value only (no gradient wanted), the student's gradient, both sides' (online peers)
    student = torch.relu(randn(96, 40, seed=80)) + 0.5
    teacher = torch.relu(randn(96, 64, seed=81))
    results = {}
    for form in ("kernel", "torch"):
        monkeypatch.setattr(losses, "_KERNELS", False if form == "kernel" else None)
        with torch.no_grad():
            value_only = rkd_loss(student, teacher).item()
        s1 = student.clone().requires_grad_()
        one = rkd_loss(s1, teacher)
        one.backward()
        s2, t2 = student.clone().requires_grad_(), teacher.clone().requires_grad_()
        both = rkd_loss(s2, t2, teacher_grad=True)
        both.backward()
        results[form] = (value_only, one.item(), s1.grad, both.item(), s2.grad, t2.grad)
    kernel, torch_form = results["kernel"], results["torch"]
    assert kernel[0] == pytest.approx(torch_form[0], rel=1e-6)
    assert kernel[1] == pytest.approx(kernel[0], rel=1e-12)
    assert kernel[3] == pytest.approx(torch_form[3], rel=1e-6)
    for n in (2, 4, 5):  # the student's gradient alone; the student's and teacher's of both
        a, b = kernel[n], torch_form[n]
        scale = b.abs().max().item()
        assert scale > 0
        assert (a - b).abs().max().item() <= 1e-5 * scale
    # both sides' call gives the student the same gradient as the student-only call
    assert torch.allclose(kernel[2], kernel[4], rtol=0, atol=1e-6 * kernel[2].abs().max().item())


def test_rkd_nan_embedding_gives_nan_loss(rkd_form: str) -> None:
    # the training loop's non-finite guard must see it (the kernel's clamps keep NaN)
    student, teacher = randn(8, 4, seed=84), randn(8, 4, seed=85)
    student[3, 1] = float("nan")
    assert math.isnan(rkd_loss(student, teacher).item())
    assert math.isnan(rkd_loss(teacher, student).item())


def test_rkd_without_numba_warns_and_gives_the_same_value(monkeypatch) -> None:
    import sys

    student, teacher = randn(16, 8, seed=88), randn(16, 8, seed=89)
    expected = rkd_loss(student, teacher).item()
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba -> ImportError
    monkeypatch.delitem(sys.modules, "kdbench.kernels", raising=False)
    monkeypatch.delattr(sys.modules["kdbench"], "kernels", raising=False)
    monkeypatch.setattr(losses, "_KERNELS", False)
    with pytest.warns(RuntimeWarning, match="numba"):
        value = rkd_loss(student, teacher).item()
    assert losses._KERNELS is None
    assert value == pytest.approx(expected, rel=1e-6)


def test_rkd_batch_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="batch"):
        rkd_loss(torch.zeros(3, 4), torch.zeros(4, 4))


# --------------------------------------------------------------------------------------------
# pkt, sp, nst
# --------------------------------------------------------------------------------------------


def test_pkt_matches_loop_formula() -> None:
    student = randn(4, 5, seed=41)
    teacher = randn(4, 3, seed=42)
    eps = 1e-7

    def conditional(x: torch.Tensor) -> list[list[float]]:
        e = rows(x)
        hat = [[v / (math.sqrt(sum(w * w for w in r)) + eps) for v in r] for r in e]
        k = [[(sum(a * b for a, b in zip(u, v, strict=True)) + 1) / 2 for v in hat] for u in hat]
        return [[v / sum(r) for v in r] for r in k]

    p_s, p_t = conditional(student), conditional(teacher)
    expected = (
        sum(
            p_t[i][j] * math.log((p_t[i][j] + eps) / (p_s[i][j] + eps))
            for i in range(4)
            for j in range(4)
        )
        / 16
    )
    # values are O(1e-2) differences of logs of numbers near 1: float32 gives ~1e-7 absolute
    assert pkt_loss(student, teacher).item() == pytest.approx(expected, rel=REL, abs=1e-7)


def test_pkt_zero_for_identical_embeddings() -> None:
    e = randn(4, 5, seed=43)
    assert pkt_loss(e, 3.0 * e).item() == pytest.approx(0.0, abs=1e-7)


def test_pkt_worked_example() -> None:
    # e_s = [[1, 0], [0, 1]]: x_hat x_hat^T = I -> K = [[1, 1/2], [1/2, 1]] -> P_s rows
    # [2/3, 1/3], [1/3, 2/3]. e_t = [[1, 0], [1, 0]]: x_hat x_hat^T = all ones -> K = all ones
    # -> P_t = all 1/2. L = mean(P_t log(P_t / P_s)) = (1/4) * 2 * [1/2 ln(3/4) + 1/2 ln(3/2)]
    #   = (1/4) * ln(9/8) = 0.25 * 0.1177830 = 0.0294458 (eps changes it below 1e-6)
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert pkt_loss(student, teacher).item() == pytest.approx(0.25 * math.log(9.0 / 8.0), rel=1e-5)


def test_sp_matches_loop_formula() -> None:
    student = randn(4, 2, 3, 3, seed=44)
    teacher = randn(4, 5, 2, 2, seed=45)

    def gram(x: torch.Tensor) -> np.ndarray:
        f = x.double().reshape(4, -1).numpy()
        g = np.array([[float(np.dot(f[i], f[j])) for j in range(4)] for i in range(4)])
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    expected = float(((gram(teacher) - gram(student)) ** 2).sum()) / 4**2
    assert sp_loss(student, teacher).item() == approx(expected)


def test_sp_worked_example() -> None:
    # F_s = [[1, 0], [0, 1]] -> G_s = I (rows already unit). F_t = [[1, 0], [1, 0]] ->
    # G_t = all ones -> rows normalised to [1/sqrt2, 1/sqrt2].
    # G_t - G_s = [[1/sqrt2 - 1, 1/sqrt2], [1/sqrt2, 1/sqrt2 - 1]]
    # ||.||_F^2 = 2 * (0.2928932^2 + 0.7071068^2) = 2 * (0.0857864 + 0.5) = 1.1715729
    # / B^2 = / 4 -> 0.2928932 (= 1 - 1/sqrt2)
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert sp_loss(student, teacher).item() == approx(1.0 - 1.0 / math.sqrt(2.0))


def nst_reference(student: torch.Tensor, teacher: torch.Tensor) -> float:
    def normalised(x: torch.Tensor) -> np.ndarray:
        f = x.double().reshape(x.shape[0], x.shape[1], -1).numpy()
        return f / np.linalg.norm(f, axis=2, keepdims=True)

    s, t = normalised(student), normalised(teacher)

    def kernel_mean(a: np.ndarray, b: np.ndarray) -> float:
        values = [
            float(np.dot(a[i], b[j])) ** 2 for i in range(a.shape[0]) for j in range(b.shape[0])
        ]
        return sum(values) / len(values)

    per_sample = [
        kernel_mean(s[n], s[n]) + kernel_mean(t[n], t[n]) - 2 * kernel_mean(s[n], t[n])
        for n in range(s.shape[0])
    ]
    return sum(per_sample) / len(per_sample)


def test_nst_matches_loop_formula() -> None:
    student = randn(3, 4, 3, 3, seed=46)
    teacher = randn(3, 5, 3, 3, seed=47)
    assert nst_loss(student, teacher).item() == approx(nst_reference(student, teacher))


def test_nst_pools_the_larger_map() -> None:
    student = randn(2, 3, 4, 4, seed=48)
    teacher = randn(2, 2, 2, 2, seed=49)
    pooled = student.reshape(2, 3, 2, 2, 2, 2).mean(dim=(3, 5))
    assert nst_loss(student, teacher).item() == approx(nst_reference(pooled, teacher))


def test_nst_worked_example() -> None:
    # B = 1, HW = 2. student channels [1, 0] and [0, 1] (unit already); teacher channel [3, 4]
    # -> normalised [0.6, 0.8].
    # K(s, s) = (s s^T)^2 = I -> mean 2/4 = 0.5; K(t, t) = [[1]] -> 1;
    # K(s, t) = [0.6^2, 0.8^2] = [0.36, 0.64] -> mean 0.5.  L = 0.5 + 1 - 2 * 0.5 = 0.5
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    teacher = torch.tensor([[[3.0, 4.0]]])
    assert nst_loss(student, teacher).item() == approx(0.5)


# --------------------------------------------------------------------------------------------
# properties shared by every loss
# --------------------------------------------------------------------------------------------


def _loss_cases() -> list[tuple[str, object, tuple[int, ...], tuple[int, ...]]]:
    target = torch.tensor([1, 0, 4, 2])
    return [
        ("kd", kd_loss, (4, 5), (4, 5)),
        ("reverse_kd", reverse_kd_loss, (4, 5), (4, 5)),
        ("hard_label", hard_label_loss, (4, 5), (4, 5)),
        ("dkd", lambda s, t: dkd_loss(s, t, target), (4, 5), (4, 5)),
        ("dist", dist_loss, (4, 5), (4, 5)),
        ("fitnet", fitnet_loss, (4, 3, 4, 4), (4, 3, 4, 4)),
        ("attention", lambda s, t: attention_loss([s], [t]), (4, 3, 8, 8), (4, 5, 4, 4)),
        ("rkd", rkd_loss, (4, 6), (4, 3)),
        ("pkt", pkt_loss, (4, 6), (4, 3)),
        ("sp", sp_loss, (4, 3, 4, 4), (4, 5, 2, 2)),
        ("nst", nst_loss, (4, 3, 4, 4), (4, 5, 4, 4)),
    ]


@pytest.mark.parametrize(("name", "fn", "s_shape", "t_shape"), _loss_cases())
def test_scalar_and_gradient_flows_to_student(
    name: str, fn: object, s_shape: tuple[int, ...], t_shape: tuple[int, ...]
) -> None:
    student = randn(*s_shape, seed=50).requires_grad_()
    teacher = randn(*t_shape, seed=51)
    out = fn(student, teacher)  # type: ignore[operator]
    assert out.dim() == 0, name
    assert out.dtype == torch.float32, name
    out.backward()
    assert student.grad is not None, name
    assert torch.isfinite(student.grad).all(), name
    assert student.grad.abs().sum() > 0, name


@pytest.mark.parametrize(("name", "fn", "s_shape", "t_shape"), _loss_cases())
def test_half_precision_inputs(
    name: str, fn: object, s_shape: tuple[int, ...], t_shape: tuple[int, ...]
) -> None:
    student = randn(*s_shape, seed=52).bfloat16()
    teacher = randn(*t_shape, seed=53).bfloat16()
    out = fn(student, teacher)  # type: ignore[operator]
    reference = fn(student.float(), teacher.float())  # type: ignore[operator]
    assert out.dtype == torch.float32, name
    torch.testing.assert_close(out, reference, rtol=REL, atol=1e-6)


def test_logit_losses_reject_mismatched_shapes() -> None:
    for fn in (kd_loss, reverse_kd_loss, hard_label_loss, dist_loss):
        with pytest.raises(ValueError, match="shape"):
            fn(torch.zeros(4, 5), torch.zeros(4, 6))
    with pytest.raises(ValueError, match="target"):
        dkd_loss(torch.zeros(4, 5), torch.zeros(4, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.zeros(4, 5), torch.zeros(4, 5), temperature=0.0)


def test_public_api() -> None:
    expected = {
        "kd_loss",
        "reverse_kd_loss",
        "hard_label_loss",
        "fitnet_loss",
        "attention_map",
        "attention_loss",
        "rkd_loss",
        "pkt_loss",
        "sp_loss",
        "nst_loss",
        "dkd_loss",
        "dist_loss",
        "logit_standardize",
        "VIDLoss",
        "CRDLoss",
        # the variants of schemes and teachers (METHODS.md "Variants")
        "byot_loss",
        "byot_feature_loss",
        "tfkd_loss",
        "virtual_teacher_probs",
        "pskd_targets",
        "pskd_loss",
        "entropy_weights",
        "ca_mkd_weights",
        "weighted_mixture_logits",
        # token-level distillation of language models (issue #13)
        "jsd_loss",
        "skew_kl_loss",
        "skew_reverse_kl_loss",
        "tvd_loss",
        "hidden_cosine_loss",
        "minilm_loss",
        "topk_teacher_logits",
        "topk_student_logits",
        "weighted_kd_loss",
        "discriminator_loss",
        "discriminator_accuracy",
        "adversarial_generator_loss",
        "dafl_one_hot_loss",
        "dafl_activation_loss",
        "dafl_entropy_loss",
        "bn_statistics_loss",
    }
    assert set(losses.__all__) == expected
    for name in expected:
        assert callable(getattr(losses, name))


def test_attention_loss_uses_reference_pooling() -> None:
    # The pooling is torch's adaptive average pooling; for 8 -> 4 it equals avg_pool2d(2).
    large = randn(2, 3, 8, 8, seed=54)
    small = randn(2, 3, 4, 4, seed=55)
    expected = attention_loss([F.avg_pool2d(large, 2)], [small]).item()
    assert attention_loss([large], [small]).item() == approx(expected)
