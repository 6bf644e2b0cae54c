"""Tests for the stateful losses of kdbench.losses (VIDLoss, CRDLoss).

Every expected value is computed here from the formulas in METHODS.md and the reference code
(plain-float loops in float64, numpy only for holding arrays) or derived by hand in a comment;
none is captured from running the implementation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kdbench.losses import CRDLoss, VIDLoss

REL = 1e-5


def approx(value: float, rel: float = REL, abs: float = 1e-6):  # noqa: A002
    return pytest.approx(value, rel=rel, abs=abs)


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator) * scale


def softplus(x: float) -> float:
    return math.log(1.0 + math.exp(x))


# --------------------------------------------------------------------------------------------
# VID: plain-float reference
# --------------------------------------------------------------------------------------------


def vid_reference(mu: np.ndarray, target: np.ndarray, log_scale: list[float], eps: float) -> float:
    """mean over every element of 0.5 * ((mu - t)^2 / var_c + log var_c), channel axis 1."""
    var = [softplus(s) + eps for s in log_scale]
    total, count = 0.0, 0
    for position in np.ndindex(*mu.shape):
        c = position[1]
        d = float(mu[position]) - float(target[position])
        total += 0.5 * (d * d / var[c] + math.log(var[c]))
        count += 1
    return total / count


def adaptive_avg_pool_reference(x: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Adaptive average pooling of the trailing axes (torch's windows).

    Output position i of an axis of input size n and output size s averages the inputs
    [floor(i * n / s), ceil((i + 1) * n / s)).
    """
    spatial = x.shape[2:]
    out = np.zeros(x.shape[:2] + tuple(size))
    for b, c, *pos in np.ndindex(*out.shape):
        slices = []
        for i, n, s in zip(pos, spatial, size, strict=True):
            slices.append(slice((i * n) // s, -((-(i + 1) * n) // s)))
        out[(b, c, *pos)] = x[(b, c, *slices)].mean()
    return out


def set_regressor(loss: VIDLoss, matrices: list[list[list[float]]]) -> None:
    """Load the three 1x1 conv (or linear) layers from out x in matrices."""
    layers = [m for m in loss.regressor if not isinstance(m, nn.ReLU)]
    assert len(layers) == 3
    with torch.no_grad():
        for layer, matrix in zip(layers, matrices, strict=True):
            w = torch.tensor(matrix, dtype=torch.float32)
            layer.weight.copy_(w.reshape(layer.weight.shape))


def apply_matrices(x: np.ndarray, matrices: list[list[list[float]]]) -> np.ndarray:
    """W3 relu(W2 relu(W1 x)) at every position, channel axis 1, by explicit loops."""
    h = x.astype(np.float64)
    for layer_index, w in enumerate(matrices):
        out_channels = len(w)
        new = np.zeros((h.shape[0], out_channels) + h.shape[2:])
        for b in range(h.shape[0]):
            for pos in np.ndindex(*h.shape[2:]):
                for o in range(out_channels):
                    acc = 0.0
                    for i in range(h.shape[1]):
                        acc += w[o][i] * h[(b, i, *pos)]
                    new[(b, o, *pos)] = acc
        if layer_index < 2:
            new = np.maximum(new, 0.0)
        h = new
    return h


# --------------------------------------------------------------------------------------------
# VID tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init_pred_var", [5.0, 2.0, 0.1])
def test_vid_initial_variance(init_pred_var: float) -> None:
    loss = VIDLoss(4, 6, init_pred_var=init_pred_var)
    assert isinstance(loss.log_scale, nn.Parameter)
    assert loss.log_scale.requires_grad
    assert loss.log_scale.shape == (6,)
    for s in loss.log_scale.tolist():
        # var = log(1 + exp(log(exp(v - eps) - 1))) + eps = (v - eps) + eps = v
        assert softplus(s) + 1e-5 == approx(init_pred_var, rel=0, abs=1e-5)
    names = {name for name, _ in loss.named_parameters()}
    assert "log_scale" in names


@pytest.mark.parametrize(
    ("spatial_dims", "layer_type"), [(0, nn.Linear), (1, nn.Conv1d), (2, nn.Conv2d)]
)
def test_vid_regressor_structure(spatial_dims: int, layer_type: type) -> None:
    loss = VIDLoss(3, 7, spatial_dims=spatial_dims)
    kinds = [type(m) for m in loss.regressor]
    assert kinds == [layer_type, nn.ReLU, layer_type, nn.ReLU, layer_type]
    layers = [loss.regressor[i] for i in (0, 2, 4)]
    # mid_channels defaults to teacher_channels: 3 -> 7 -> 7 -> 7
    assert [tuple(layer.weight.shape[:2]) for layer in layers] == [(7, 3), (7, 7), (7, 7)]
    assert all(layer.bias is None for layer in layers)
    if spatial_dims > 0:
        assert all(set(layer.kernel_size) == {1} for layer in layers)
    loss = VIDLoss(3, 7, mid_channels=5, spatial_dims=spatial_dims)
    layers = [loss.regressor[i] for i in (0, 2, 4)]
    assert [tuple(layer.weight.shape[:2]) for layer in layers] == [(5, 3), (5, 5), (7, 5)]


def test_vid_identity_regressor_matches_hand_formula() -> None:
    loss = VIDLoss(3, 3, spatial_dims=2)
    loss.regressor = nn.Identity()
    log_scale = [-1.0, 0.5, 2.0]
    with torch.no_grad():
        loss.log_scale.copy_(torch.tensor(log_scale))
    student = randn(2, 3, 2, 3, seed=1)
    teacher = randn(2, 3, 2, 3, seed=2)
    out = loss(student, teacher)
    assert out.dim() == 0 and out.dtype == torch.float32
    expected = vid_reference(student.double().numpy(), teacher.double().numpy(), log_scale, 1e-5)
    assert out.item() == approx(expected)


def test_vid_single_element_by_hand() -> None:
    # mu = 3, t = 1, log_scale = 0: var = log 2 + 1e-5 = 0.6931571806;
    # 0.5 * (4 / 0.6931571806 + log 0.6931571806) = 0.5 * (5.770697 - 0.366498) = 2.702099
    loss = VIDLoss(1, 1, spatial_dims=0)
    loss.regressor = nn.Identity()
    with torch.no_grad():
        loss.log_scale.zero_()
    out = loss(torch.tensor([[3.0]]), torch.tensor([[1.0]]))
    var = math.log(2.0) + 1e-5
    assert out.item() == approx(0.5 * (4.0 / var + math.log(var)))
    assert out.item() == approx(2.702099, rel=1e-6)


# W1: 2 -> 3, W2: 3 -> 3, W3: 3 -> 3 (student 2 channels, mid 3, teacher 3)
MATRICES = [
    [[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]],
    [[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.0, -1.0, 1.0]],
    [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 0.0, -1.0]],
]


@pytest.mark.parametrize(
    ("spatial_dims", "s_shape", "t_shape"),
    [(0, (4, 2), (4, 3)), (1, (2, 2, 5), (2, 3, 5)), (2, (2, 2, 3, 2), (2, 3, 3, 2))],
)
def test_vid_known_regressor_weights(spatial_dims: int, s_shape: tuple, t_shape: tuple) -> None:
    loss = VIDLoss(2, 3, spatial_dims=spatial_dims)
    set_regressor(loss, MATRICES)
    log_scale = [0.3, -0.7, 1.5]
    with torch.no_grad():
        loss.log_scale.copy_(torch.tensor(log_scale))
    student = randn(*s_shape, seed=3)  # has negative entries: the ReLUs matter
    teacher = randn(*t_shape, seed=4)
    mu = apply_matrices(student.double().numpy(), MATRICES)
    expected = vid_reference(mu, teacher.double().numpy(), log_scale, 1e-5)
    assert loss(student, teacher).item() == approx(expected)


@pytest.mark.parametrize(
    ("s_shape", "t_shape"),
    [
        ((2, 3, 8, 8), (2, 3, 4, 4)),  # student larger: pool the student
        ((2, 3, 2, 3), (2, 3, 4, 6)),  # teacher larger: pool the teacher
        ((2, 3, 7), (2, 3, 3)),  # 1-D, overlapping adaptive windows
        ((2, 3, 2), (2, 3, 6)),
    ],
)
def test_vid_pools_the_larger_map(s_shape: tuple, t_shape: tuple) -> None:
    spatial_dims = len(s_shape) - 2
    loss = VIDLoss(3, 3, spatial_dims=spatial_dims)
    loss.regressor = nn.Identity()
    log_scale = [0.0, 1.0, -0.5]
    with torch.no_grad():
        loss.log_scale.copy_(torch.tensor(log_scale))
    student = randn(*s_shape, seed=5)
    teacher = randn(*t_shape, seed=6)
    size = tuple(min(a, b) for a, b in zip(s_shape[2:], t_shape[2:], strict=True))
    s = adaptive_avg_pool_reference(student.double().numpy(), size)
    t = adaptive_avg_pool_reference(teacher.double().numpy(), size)
    expected = vid_reference(s, t, log_scale, 1e-5)
    assert loss(student, teacher).item() == approx(expected)


def test_vid_log_scale_gets_gradient_and_is_trained() -> None:
    loss = VIDLoss(2, 2, spatial_dims=1)
    loss.regressor = nn.Identity()
    log_scale = [0.2, -0.4]
    with torch.no_grad():
        loss.log_scale.copy_(torch.tensor(log_scale))
    student = randn(3, 2, 4, seed=7)
    teacher = randn(3, 2, 4, seed=8)
    loss(student, teacher).backward()
    assert loss.log_scale.grad is not None
    # d/ds_c of mean(0.5 (d^2 / var + log var)) with var = softplus(s) + eps:
    #   (1/N) * sum over channel-c elements of 0.5 * (1/var - d^2/var^2) * sigmoid(s_c)
    s_np, t_np = student.double().numpy(), teacher.double().numpy()
    n_elements = s_np.size
    expected = []
    for c, s_c in enumerate(log_scale):
        var = softplus(s_c) + 1e-5
        sig = 1.0 / (1.0 + math.exp(-s_c))
        total = 0.0
        for b in range(3):
            for i in range(4):
                d = s_np[b, c, i] - t_np[b, c, i]
                total += 0.5 * (1.0 / var - d * d / var**2) * sig
        expected.append(total / n_elements)
    for got, want in zip(loss.log_scale.grad.tolist(), expected, strict=True):
        assert got == approx(want)
    optimizer = torch.optim.SGD(loss.parameters(), lr=0.5)
    optimizer.step()
    for got, old, grad in zip(loss.log_scale.tolist(), log_scale, expected, strict=True):
        assert got == approx(old - 0.5 * grad)


def test_vid_regressor_is_trained_with_student() -> None:
    loss = VIDLoss(4, 6, spatial_dims=2)
    student = randn(2, 4, 3, 3, seed=9).requires_grad_(True)
    teacher = randn(2, 6, 3, 3, seed=10)
    loss(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    for layer in (loss.regressor[0], loss.regressor[2], loss.regressor[4]):
        assert layer.weight.grad is not None


def test_vid_casts_to_float32_and_checks_shapes() -> None:
    loss = VIDLoss(3, 3, spatial_dims=2)
    out = loss(randn(2, 3, 4, 4, seed=11).bfloat16(), randn(2, 3, 4, 4, seed=12).bfloat16())
    assert out.dim() == 0 and out.dtype == torch.float32 and torch.isfinite(out)
    with pytest.raises(ValueError, match="dims"):
        loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="teacher channels"):
        loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, 4))
    with pytest.raises(ValueError, match="batch"):
        loss(torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4))
    with pytest.raises(ValueError, match="spatial_dims"):
        VIDLoss(3, 3, spatial_dims=3)


# --------------------------------------------------------------------------------------------
# CRD: plain-float reference (loops)
# --------------------------------------------------------------------------------------------


def l2_normalize(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def linear(weight: np.ndarray, bias: np.ndarray, x: list[float]) -> list[float]:
    return [
        sum(float(weight[o, i]) * x[i] for i in range(len(x))) + float(bias[o])
        for o in range(weight.shape[0])
    ]


def nce_reference(x: list[list[float]], z: float, n_data: int, eps: float) -> float:
    """-(1/B) sum_i [log(P_i0 / (P_i0 + m Pn + eps)) + sum_j log(m Pn / (P_ij + m Pn + eps))]."""
    m = len(x[0]) - 1
    noise = m * (1.0 / n_data)
    total = 0.0
    for row in x:
        p_pos = row[0] / z
        total += math.log(p_pos / (p_pos + noise + eps))
        for value in row[1:]:
            p_neg = value / z
            total += math.log(noise / (p_neg + noise + eps))
    return -total / len(x)


def crd_reference(
    loss: CRDLoss,
    mem_s: np.ndarray,
    mem_t: np.ndarray,
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    index: list[int],
    contrast: list[list[int]],
    z: tuple[float, float] | None,
    momentum: float = 0.5,
) -> tuple[float, tuple[float, float], np.ndarray, np.ndarray]:
    """Loss, the (Z_s, Z_t) used, and the banks after the momentum update."""
    w_s, b_s = loss.embed_s.weight.detach().double().numpy(), loss.embed_s.bias.detach().numpy()
    w_t, b_t = loss.embed_t.weight.detach().double().numpy(), loss.embed_t.bias.detach().numpy()
    n_data, tau, eps = loss.n_data, loss.nce_t, loss.eps
    xs = f_s.double().reshape(len(index), -1).tolist()
    xt = f_t.double().reshape(len(index), -1).tolist()
    v_s = [l2_normalize(linear(w_s, b_s, x)) for x in xs]
    v_t = [l2_normalize(linear(w_t, b_t, x)) for x in xt]

    def dot(a, b) -> float:
        return sum(float(p) * float(q) for p, q in zip(a, b, strict=True))

    out_s, out_t = [], []
    for i in range(len(index)):
        ids = [index[i], *contrast[i]]
        out_s.append([math.exp(dot(mem_t[n], v_s[i]) / tau) for n in ids])  # student anchor
        out_t.append([math.exp(dot(mem_s[n], v_t[i]) / tau) for n in ids])  # teacher anchor
    if z is None:
        count = len(index) * (len(contrast[0]) + 1)
        z = (
            sum(sum(r) for r in out_s) / count * n_data,
            sum(sum(r) for r in out_t) / count * n_data,
        )
    value = nce_reference(out_s, z[0], n_data, eps) + nce_reference(out_t, z[1], n_data, eps)

    new_s, new_t = mem_s.copy(), mem_t.copy()
    for i, n in enumerate(index):
        new_s[n] = l2_normalize(
            [
                momentum * float(a) + (1 - momentum) * b
                for a, b in zip(mem_s[n], v_s[i], strict=True)
            ]
        )
        new_t[n] = l2_normalize(
            [
                momentum * float(a) + (1 - momentum) * b
                for a, b in zip(mem_t[n], v_t[i], strict=True)
            ]
        )
    return value, z, new_s, new_t


N_DATA, FEAT, K, B, D_S, D_T = 20, 4, 5, 3, 6, 5


def make_crd(seed: int = 0) -> tuple[CRDLoss, np.ndarray, np.ndarray]:
    """A tiny CRDLoss with memory banks set to known unit rows."""
    torch.manual_seed(seed)
    loss = CRDLoss(D_S, D_T, n_data=N_DATA, feat_dim=FEAT, nce_k=K)
    rng = np.random.default_rng(seed)
    mem_s = rng.normal(size=(N_DATA, FEAT))
    mem_t = rng.normal(size=(N_DATA, FEAT))
    mem_s /= np.linalg.norm(mem_s, axis=1, keepdims=True)
    mem_t /= np.linalg.norm(mem_t, axis=1, keepdims=True)
    with torch.no_grad():
        loss.memory_s.copy_(torch.from_numpy(mem_s))
        loss.memory_t.copy_(torch.from_numpy(mem_t))
    # the float32 banks are what the module sees: use them as the reference's starting point
    return loss, loss.memory_s.double().numpy().copy(), loss.memory_t.double().numpy().copy()


INDEX_1 = [2, 7, 11]
CONTRAST_1 = [[0, 5, 9, 13, 19], [1, 3, 3, 16, 18], [4, 6, 8, 10, 12]]
INDEX_2 = [7, 15, 0]
CONTRAST_2 = [[2, 11, 14, 17, 19], [1, 2, 3, 4, 5], [9, 9, 12, 18, 6]]


def long(x: list) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# CRD tests
# --------------------------------------------------------------------------------------------


def test_crd_initial_state() -> None:
    loss = CRDLoss(8, 12, n_data=50, feat_dim=16, nce_k=7)
    stdv = 1.0 / math.sqrt(16 / 3)  # 0.4330127
    for bank in (loss.memory_s, loss.memory_t):
        assert bank.shape == (50, 16) and bank.dtype == torch.float32
        assert bank.min().item() >= -stdv and bank.max().item() <= stdv
        assert bank.std().item() > 0.1  # uniform on [-0.433, 0.433]: std 0.25
    assert not torch.equal(loss.memory_s, loss.memory_t)
    assert loss.z.tolist() == [-1.0, -1.0]
    assert isinstance(loss.embed_s, nn.Linear) and isinstance(loss.embed_t, nn.Linear)
    assert tuple(loss.embed_s.weight.shape) == (16, 8)
    assert tuple(loss.embed_t.weight.shape) == (16, 12)


def test_crd_loss_matches_loop_reference_and_z_is_fixed() -> None:
    loss, mem_s, mem_t = make_crd(seed=1)
    loss.train()
    f_s1, f_t1 = randn(B, D_S, seed=20), randn(B, D_T, seed=21)
    expected_1, z_1, mem_s, mem_t = crd_reference(
        loss, mem_s, mem_t, f_s1, f_t1, INDEX_1, CONTRAST_1, z=None
    )
    out_1 = loss(f_s1, f_t1, long(INDEX_1), long(CONTRAST_1))
    assert out_1.dim() == 0 and out_1.dtype == torch.float32
    assert out_1.item() == approx(expected_1, rel=1e-4)
    assert loss.z.tolist() == [approx(z_1[0], rel=1e-4), approx(z_1[1], rel=1e-4)]

    # second call, different inputs and indices: the Z of the first call is kept, and the
    # banks are the ones updated by the first call
    f_s2, f_t2 = randn(B, D_S, seed=22, scale=3.0), randn(B, D_T, seed=23, scale=0.5)
    expected_2, z_used, _, _ = crd_reference(
        loss, mem_s, mem_t, f_s2, f_t2, INDEX_2, CONTRAST_2, z=z_1
    )
    assert z_used == z_1
    out_2 = loss(f_s2, f_t2, long(INDEX_2), long(CONTRAST_2))
    assert out_2.item() == approx(expected_2, rel=1e-4)
    assert loss.z.tolist() == [approx(z_1[0], rel=1e-4), approx(z_1[1], rel=1e-4)]
    # the check discriminates: a Z recomputed from the second batch gives another loss
    recomputed, z_new, _, _ = crd_reference(
        loss, mem_s, mem_t, f_s2, f_t2, INDEX_2, CONTRAST_2, z=None
    )
    assert abs(z_new[0] - z_1[0]) > 1e-3 * z_1[0]
    assert abs(recomputed - expected_2) > 1e-3


def test_crd_flattens_inputs() -> None:
    loss, mem_s, mem_t = make_crd(seed=2)
    f_s, f_t = randn(B, 2, 3, seed=24), randn(B, D_T, 1, seed=25)
    expected, _, _, _ = crd_reference(loss, mem_s, mem_t, f_s, f_t, INDEX_1, CONTRAST_1, z=None)
    assert loss(f_s, f_t, long(INDEX_1), long(CONTRAST_1)).item() == approx(expected, rel=1e-4)


def test_crd_memory_update_momentum_and_normalisation() -> None:
    loss, mem_s, mem_t = make_crd(seed=3)
    loss.train()
    f_s, f_t = randn(B, D_S, seed=26), randn(B, D_T, seed=27)
    _, _, new_s, new_t = crd_reference(loss, mem_s, mem_t, f_s, f_t, INDEX_1, CONTRAST_1, z=None)
    loss(f_s, f_t, long(INDEX_1), long(CONTRAST_1))
    got_s, got_t = loss.memory_s.double().numpy(), loss.memory_t.double().numpy()
    np.testing.assert_allclose(got_s, new_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_t, new_t, rtol=1e-5, atol=1e-6)
    for n in INDEX_1:
        assert np.linalg.norm(got_s[n]) == approx(1.0)
        assert np.linalg.norm(got_t[n]) == approx(1.0)
        assert not np.allclose(got_s[n], mem_s[n])
    untouched = [n for n in range(N_DATA) if n not in INDEX_1]
    np.testing.assert_array_equal(got_s[untouched], mem_s[untouched])
    np.testing.assert_array_equal(got_t[untouched], mem_t[untouched])


def test_crd_no_memory_update_in_eval_mode() -> None:
    loss, mem_s, mem_t = make_crd(seed=4)
    loss.eval()
    f_s, f_t = randn(B, D_S, seed=28), randn(B, D_T, seed=29)
    expected, z, _, _ = crd_reference(loss, mem_s, mem_t, f_s, f_t, INDEX_1, CONTRAST_1, z=None)
    out = loss(f_s, f_t, long(INDEX_1), long(CONTRAST_1))
    assert out.item() == approx(expected, rel=1e-4)
    np.testing.assert_array_equal(loss.memory_s.double().numpy(), mem_s)
    np.testing.assert_array_equal(loss.memory_t.double().numpy(), mem_t)
    # Z is fixed by the first call whatever the mode (as in the reference code)
    assert loss.z.tolist() == [approx(z[0], rel=1e-4), approx(z[1], rel=1e-4)]


def test_crd_state_dict_buffers_and_parameters() -> None:
    loss, _, _ = make_crd(seed=5)
    loss.train()
    loss(randn(B, D_S, seed=30), randn(B, D_T, seed=31), long(INDEX_1), long(CONTRAST_1))
    state = loss.state_dict()
    assert {"memory_s", "memory_t", "z"} <= set(state)
    assert dict(loss.named_buffers()).keys() == {"memory_s", "memory_t", "z"}
    params = {name for name, _ in loss.named_parameters()}
    assert params == {"embed_s.weight", "embed_s.bias", "embed_t.weight", "embed_t.bias"}
    for bank in (loss.memory_s, loss.memory_t, loss.z):
        assert not bank.requires_grad

    fresh = CRDLoss(D_S, D_T, n_data=N_DATA, feat_dim=FEAT, nce_k=K)
    assert fresh.z.tolist() == [-1.0, -1.0]
    fresh.load_state_dict(state)
    assert torch.equal(fresh.memory_s, loss.memory_s)
    assert torch.equal(fresh.memory_t, loss.memory_t)
    assert torch.equal(fresh.z, loss.z)
    # a restored Z is "set": the next call keeps it
    z_before = fresh.z.clone()
    fresh(
        randn(B, D_S, seed=32, scale=4.0), randn(B, D_T, seed=33), long(INDEX_2), long(CONTRAST_2)
    )
    assert torch.equal(fresh.z, z_before)


def test_crd_gradients_reach_heads_not_banks() -> None:
    loss, _, _ = make_crd(seed=6)
    loss.train()
    f_s = randn(B, D_S, seed=34).requires_grad_(True)
    f_t = randn(B, D_T, seed=35)
    out = loss(f_s, f_t, long(INDEX_1), long(CONTRAST_1))
    out.backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    for head in (loss.embed_s, loss.embed_t):
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
        assert head.bias.grad is not None
    assert not loss.memory_s.requires_grad and loss.memory_s.grad is None
    assert not loss.memory_t.requires_grad and loss.memory_t.grad is None


def test_crd_casts_to_float32_and_checks_shapes() -> None:
    loss, _, _ = make_crd(seed=7)
    out = loss(
        randn(B, D_S, seed=36).bfloat16(),
        randn(B, D_T, seed=37).half(),
        long(INDEX_1),
        long(CONTRAST_1),
    )
    assert out.dim() == 0 and out.dtype == torch.float32 and torch.isfinite(out)
    with pytest.raises(ValueError, match="batch"):
        loss(torch.zeros(B, D_S), torch.zeros(B + 1, D_T), long(INDEX_1), long(CONTRAST_1))
    with pytest.raises(ValueError, match="index"):
        loss(torch.zeros(B, D_S), torch.zeros(B, D_T), long(INDEX_1[:2]), long(CONTRAST_1))
    with pytest.raises(ValueError, match="contrast_index"):
        loss(torch.zeros(B, D_S), torch.zeros(B, D_T), long(INDEX_1), long(INDEX_1))


def test_crd_reference_defaults_train_a_few_steps() -> None:
    # the benchmark's sizes: 16384 negatives, 128-d embeddings, tau 0.07, momentum 0.5
    torch.manual_seed(0)
    n_data = 4000
    loss = CRDLoss(32, 48, n_data=n_data)
    assert (loss.feat_dim, loss.nce_k, loss.nce_t, loss.nce_m) == (128, 16384, 0.07, 0.5)
    labels = torch.randint(0, 10, (n_data,))
    optimizer = torch.optim.SGD(loss.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    for step in range(2):
        index = torch.randperm(n_data)[:8]
        negatives = CRDLoss.sample_negatives(index, labels, n_data, loss.nce_k, generator)
        out = loss(randn(8, 32, seed=step), randn(8, 48, seed=100 + step), index, negatives)
        assert torch.isfinite(out) and out.item() > 0
        optimizer.zero_grad()
        out.backward()
        optimizer.step()
    assert (loss.z > 0).all()


# --------------------------------------------------------------------------------------------
# sample_negatives
# --------------------------------------------------------------------------------------------


def test_sample_negatives_labelled_anchors_avoid_own_class() -> None:
    n_data = 60
    labels = torch.arange(n_data) % 4
    labels[::7] = -1  # some unlabelled samples: they count as "other" for every class
    index = long([1, 2, 3, 5, 6, 9, 10])
    generator = torch.Generator().manual_seed(0)
    out = CRDLoss.sample_negatives(index, labels, n_data, 500, generator)
    assert out.shape == (7, 500) and out.dtype == torch.long
    assert out.min().item() >= 0 and out.max().item() < n_data
    label_list = labels.tolist()
    for row, anchor in zip(out.tolist(), index.tolist(), strict=True):
        c = label_list[anchor]
        assert c >= 0
        assert all(label_list[n] != c for n in row)
        # 500 draws from <= 51 candidates: every candidate shows up, unlabelled ones included
        assert set(row) == {n for n in range(n_data) if label_list[n] != c}


def test_sample_negatives_unlabelled_anchors_avoid_themselves() -> None:
    n_data = 12
    labels = torch.tensor([0, 1, -1, 1, 0, -1, 2, 2, -1, 0, 1, 2])
    index = long([2, 5, 8, 11, 0])  # three unlabelled anchors, two labelled
    out = CRDLoss.sample_negatives(index, labels, n_data, 400, torch.Generator().manual_seed(1))
    assert out.shape == (5, 400)
    for row, anchor in zip(out.tolist()[:3], [2, 5, 8], strict=True):
        # any sample but the anchor, including the last one (n_data - 1) and its own label (-1)
        assert set(row) == set(range(n_data)) - {anchor}
    lab = labels.tolist()
    assert all(lab[n] != 2 for n in out[3].tolist())
    assert all(lab[n] != 0 for n in out[4].tolist())


def test_sample_negatives_without_labels() -> None:
    n_data = 9
    index = long([0, 4, 8, 4])
    out = CRDLoss.sample_negatives(index, None, n_data, 300, torch.Generator().manual_seed(2))
    assert out.shape == (4, 300)
    for row, anchor in zip(out.tolist(), index.tolist(), strict=True):
        assert set(row) == set(range(n_data)) - {anchor}
    again = CRDLoss.sample_negatives(index, None, n_data, 300, torch.Generator().manual_seed(2))
    assert torch.equal(out, again)  # reproducible from the generator


def test_sample_negatives_are_distinct_when_there_are_enough_candidates() -> None:
    # the reference (RepDistiller CIFAR100InstanceSample, mode 'exact'): np.random.choice(
    # cls_negative[target], k, replace=k > len(cls_negative[target])): no repeats unless the
    # anchor has fewer than k candidates
    n_data = 20
    labels = torch.tensor([0] * 10 + [1] * 5 + [-1] * 5)
    index = long([0, 3, 11, 16, 19])  # class 0 (10 candidates), class 1 (15), unlabelled (19)
    out = CRDLoss.sample_negatives(index, labels, n_data, 12, torch.Generator().manual_seed(3))
    assert out.shape == (5, 12)
    for row, anchor in zip(out.tolist(), index.tolist(), strict=True):
        c = labels[anchor].item()
        allowed = {n for n in range(n_data) if n != anchor and (c < 0 or labels[n].item() != c)}
        assert set(row) <= allowed
        if len(allowed) >= 12:
            assert len(set(row)) == 12, row  # distinct
        else:  # 10 candidates for 12 draws: with replacement, as the reference
            assert len(set(row)) < 12
    # exactly as many candidates as negatives: each candidate once
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    index = long([0, 4, 8])
    out = CRDLoss.sample_negatives(index, labels, 9, 6, torch.Generator().manual_seed(4))
    for row, anchor in zip(out.tolist(), index.tolist(), strict=True):
        assert sorted(row) == [n for n in range(9) if n % 3 != anchor % 3]


def test_sample_negatives_without_replacement_are_uniform() -> None:
    # 3000 draws of 10 negatives out of the 30 samples of other classes: each of them is drawn
    # 3000 * 10 / 30 = 1000 times in expectation (std ~26), none of the anchor's class
    n_data = 40
    labels = torch.arange(n_data) % 4
    index = torch.zeros(3000, dtype=torch.long)  # anchor 0, class 0
    out = CRDLoss.sample_negatives(index, labels, n_data, 10, torch.Generator().manual_seed(5))
    assert (out.sort(1).values.diff(dim=1) > 0).all()  # distinct within every row
    counts = torch.bincount(out.flatten(), minlength=n_data)
    assert (counts[labels == 0] == 0).all()
    assert counts[labels != 0].min() > 880 and counts[labels != 0].max() < 1120, counts


def test_sample_negatives_reference_size_is_fast_and_valid() -> None:
    n_data, batch, k = 50000, 256, 16384
    labels = torch.randint(0, 100, (n_data,), generator=torch.Generator().manual_seed(3))
    labels[:1000] = -1
    index = torch.randperm(n_data, generator=torch.Generator().manual_seed(4))[:batch]
    out = CRDLoss.sample_negatives(index, labels, n_data, k, torch.Generator().manual_seed(5))
    assert out.shape == (batch, k)
    assert out.min().item() >= 0 and out.max().item() < n_data
    anchor_labels = labels[index][:, None]
    labelled = (anchor_labels >= 0).squeeze(1)
    assert not (labels[out][labelled] == anchor_labels[labelled]).any()
    assert not (out[~labelled] == index[~labelled][:, None]).any()
    # 16384 of ~49500 candidates: no anchor's negatives repeat (with replacement ~15% would)
    assert (out.sort(1).values.diff(dim=1) > 0).all()
