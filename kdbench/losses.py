"""Distillation losses as pure functions of tensors.

Every formula follows ``METHODS.md`` (the reference-code variant where paper and code differ).
Conventions shared by all functions:

- logits are ``B x C`` with the class axis at dim 1; the batch size ``B`` is ``shape[0]``;
- inputs are cast to float32 first, so bf16/fp16 tensors are safe, and every loss is a 0-dim
  float32 tensor that keeps the autograd graph of the student arguments;
- teacher arguments are expected to be detached by the caller (only ``rkd_loss`` wraps its
  teacher side in ``torch.no_grad()`` itself, as the reference code does);
- ``KL(p || q) = sum_c p_c (log p_c - log q_c)``; "mean" is over every element of a tensor.

The two methods that carry trainable parameters or state of their own (VID's regressor and
variances, CRD's embedding heads and memory banks) are ``nn.Module`` classes at the end.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CRDLoss",
    "VIDLoss",
    "adversarial_generator_loss",
    "attention_loss",
    "attention_map",
    "bn_statistics_loss",
    "byot_feature_loss",
    "byot_loss",
    "ca_mkd_weights",
    "dafl_activation_loss",
    "dafl_entropy_loss",
    "dafl_one_hot_loss",
    "discriminator_accuracy",
    "discriminator_loss",
    "dist_loss",
    "dkd_loss",
    "entropy_weights",
    "fitnet_loss",
    "hard_label_loss",
    "hidden_cosine_loss",
    "jsd_loss",
    "kd_loss",
    "logit_standardize",
    "minilm_loss",
    "nst_loss",
    "pkt_loss",
    "pskd_loss",
    "pskd_targets",
    "reverse_kd_loss",
    "rkd_loss",
    "skew_kl_loss",
    "skew_reverse_kl_loss",
    "sp_loss",
    "tfkd_loss",
    "topk_student_logits",
    "topk_teacher_logits",
    "tvd_loss",
    "virtual_teacher_probs",
    "weighted_kd_loss",
    "weighted_mixture_logits",
]


# --------------------------------------------------------------------------------------------
# helpers (private)
# --------------------------------------------------------------------------------------------


def _check_same_shape(name: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{name}: student and teacher shapes differ: "
            f"{tuple(student.shape)} vs {tuple(teacher.shape)}"
        )


def _check_temperature(name: str, temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature!r}")


def _check_logits(name: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    _check_same_shape(name, student, teacher)
    if student.dim() < 2:
        raise ValueError(
            f"{name}: logits must be B x C (class axis at dim 1), got shape {tuple(student.shape)}"
        )


def _kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Summed KL(p || q) over every element, given log p and log q (p = exp(log p))."""
    return (log_p.exp() * (log_p - log_q)).sum()


def _pool_to_common_size(
    name: str, student: torch.Tensor, teacher: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool the larger spatial map(s) of a pair down to the smaller size."""
    if student.dim() not in (3, 4) or teacher.dim() != student.dim():
        raise ValueError(
            f"{name}: features must both be B x C x L or both B x C x H x W, got shapes "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    s_size, t_size = tuple(student.shape[2:]), tuple(teacher.shape[2:])
    if s_size == t_size:
        return student, teacher
    target = tuple(min(s, t) for s, t in zip(s_size, t_size, strict=True))
    pool = F.adaptive_avg_pool1d if student.dim() == 3 else F.adaptive_avg_pool2d
    if s_size != target:
        student = pool(student, target)
    if t_size != target:
        teacher = pool(teacher, target)
    return student, teacher


# --------------------------------------------------------------------------------------------
# response-based (logits)
# --------------------------------------------------------------------------------------------


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """Hinton KD: ``T^2 * (1/B) * sum_i KL(softmax(z_t,i / T) || softmax(z_s,i / T))``."""
    _check_logits("kd_loss", student_logits, teacher_logits)
    _check_temperature("kd_loss", temperature)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    batch = student_logits.shape[0]
    return temperature**2 * _kl_from_log_probs(log_p_t, log_p_s) / batch


def reverse_kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """Reverse KD: ``T^2 * (1/B) * sum_i KL(softmax(z_s,i / T) || softmax(z_t,i / T))``."""
    _check_logits("reverse_kd_loss", student_logits, teacher_logits)
    _check_temperature("reverse_kd_loss", temperature)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    batch = student_logits.shape[0]
    return temperature**2 * _kl_from_log_probs(log_p_s, log_p_t) / batch


def hard_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Label transfer: ``(1/B) * sum_i CE(argmax_c z_t,i, z_s,i)`` (mean cross-entropy)."""
    _check_logits("hard_label_loss", student_logits, teacher_logits)
    pseudo_labels = teacher_logits.argmax(dim=1)
    return F.cross_entropy(student_logits.float(), pseudo_labels)


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    """Decoupled KD: ``alpha * TCKD + beta * NCKD`` (no warm-up; the caller applies it).

    With ``p = softmax(z / T)`` and ``g`` the target class:
    ``TCKD = T^2 * (1/B) * sum_i KL([p_t,g, 1 - p_t,g] || [p_s,g, 1 - p_s,g])`` and
    ``NCKD = T^2 * (1/B) * sum_i KL(q_t || q_s)``, ``q = softmax(z / T - 1000 * onehot(g))``
    (the reference code subtracts 1000 from the target entry of the tempered logits).
    """
    _check_logits("dkd_loss", student_logits, teacher_logits)
    _check_temperature("dkd_loss", temperature)
    if student_logits.dim() != 2:
        raise ValueError(f"dkd_loss: logits must be B x C, got {tuple(student_logits.shape)}")
    if target.shape != student_logits.shape[:1]:
        raise ValueError(
            f"dkd_loss: target must have shape ({student_logits.shape[0]},), "
            f"got {tuple(target.shape)}"
        )
    batch, num_classes = student_logits.shape
    labels = target.long().unsqueeze(1)
    gt_mask = F.one_hot(labels.squeeze(1), num_classes).bool()
    z_s = student_logits.float() / temperature
    z_t = teacher_logits.float() / temperature

    def binary_log_probs(z: torch.Tensor) -> torch.Tensor:
        # [log p_g, log(1 - p_g)], with 1 - p_g = sum of the non-target probabilities
        log_p = F.log_softmax(z, dim=1)
        log_target = log_p.gather(1, labels).squeeze(1)
        log_other = torch.logsumexp(log_p.masked_fill(gt_mask, float("-inf")), dim=1)
        return torch.stack([log_target, log_other], dim=1)

    tckd = temperature**2 * _kl_from_log_probs(binary_log_probs(z_t), binary_log_probs(z_s))
    offset = 1000.0 * gt_mask.float()
    log_q_s = F.log_softmax(z_s - offset, dim=1)
    log_q_t = F.log_softmax(z_t - offset, dim=1)
    nckd = temperature**2 * _kl_from_log_probs(log_q_t, log_q_s)
    return (alpha * tckd + beta * nckd) / batch


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Pearson correlation as the cosine similarity of the centred rows."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    """DIST: ``tau^2 * (beta * inter + gamma * intra)`` with ``y = softmax(z / tau)``.

    ``inter = 1 - mean_i rho(y_s[i, :], y_t[i, :])`` (per sample, across classes),
    ``intra = 1 - mean_c rho(y_s[:, c], y_t[:, c])`` (per class, across samples), ``rho`` the
    Pearson correlation as the cosine similarity of the centred vectors:
    ``rho(a, b) = <a - mean a, b - mean b> / (|a - mean a| * |b - mean b| + 1e-8)``.
    """
    _check_logits("dist_loss", student_logits, teacher_logits)
    _check_temperature("dist_loss", temperature)
    if student_logits.dim() != 2:
        raise ValueError(f"dist_loss: logits must be B x C, got {tuple(student_logits.shape)}")
    y_s = F.softmax(student_logits.float() / temperature, dim=1)
    y_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    inter = 1.0 - _pearson_rows(y_s, y_t).mean()
    intra = 1.0 - _pearson_rows(y_s.t(), y_t.t()).mean()
    return temperature**2 * (beta * inter + gamma * intra)


def logit_standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardisation: ``(z - mean_c z) / (std_c z + eps)``, unbiased std over dim 1.

    Returns a float32 tensor of the input's shape (not a loss).
    """
    if logits.dim() < 2:
        raise ValueError(
            f"logit_standardize: logits must be B x C (class axis at dim 1), "
            f"got shape {tuple(logits.shape)}"
        )
    z = logits.float()
    mean = z.mean(dim=1, keepdim=True)
    std = z.std(dim=1, keepdim=True, unbiased=True)
    return (z - mean) / (std + eps)


# --------------------------------------------------------------------------------------------
# feature-based (hints)
# --------------------------------------------------------------------------------------------


def fitnet_loss(student_regressed: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """FitNet hint loss: ``mean((r(f_s) - f_t)^2)`` over every element."""
    if student_regressed.shape != teacher_feature.shape:
        raise ValueError(
            "fitnet_loss: the regressed student feature must have the teacher feature's shape, "
            f"got {tuple(student_regressed.shape)} vs {tuple(teacher_feature.shape)}; "
            "the regressor must map the student's hint to the teacher's shape"
        )
    return F.mse_loss(student_regressed.float(), teacher_feature.float(), reduction="mean")


# --------------------------------------------------------------------------------------------
# attention-based
# --------------------------------------------------------------------------------------------


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention map: ``a(f) = l2_normalize_over_spatial(mean_over_C(f^p))``, shape ``B x prod(S)``.

    ``feature`` is ``B x C x S...`` (e.g. ``B x C x L`` or ``B x C x H x W``).
    """
    if feature.dim() < 3:
        raise ValueError(
            "attention_map: feature must have a spatial axis (B x C x L or B x C x H x W), "
            f"got shape {tuple(feature.shape)}"
        )
    a = feature.float().pow(p).mean(dim=1).flatten(start_dim=1)
    return F.normalize(a, p=2.0, dim=1, eps=1e-12)


def attention_loss(
    student_features: list[torch.Tensor], teacher_features: list[torch.Tensor], p: float = 2.0
) -> torch.Tensor:
    """Attention transfer: ``sum_stages mean((a(f_s) - a(f_t))^2)``.

    When the spatial sizes of a pair differ, the larger map is adaptive-average-pooled to the
    smaller one before the attention maps are taken.
    """
    if len(student_features) != len(teacher_features):
        raise ValueError(
            "attention_loss: need one teacher feature per student feature, got "
            f"{len(student_features)} student and {len(teacher_features)} teacher features"
        )
    if len(student_features) == 0:
        raise ValueError("attention_loss: the feature lists are empty")
    losses = []
    for index, (f_s, f_t) in enumerate(zip(student_features, teacher_features, strict=True)):
        if f_s.dim() < 3 or f_t.dim() < 3:
            raise ValueError(
                f"attention_loss: stage {index} has no spatial axis, shapes "
                f"{tuple(f_s.shape)} and {tuple(f_t.shape)} (need B x C x L or B x C x H x W)"
            )
        f_s, f_t = _pool_to_common_size(f"attention_loss (stage {index})", f_s.float(), f_t.float())
        losses.append((attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean())
    return torch.stack(losses).sum()


# --------------------------------------------------------------------------------------------
# relation-based (between samples)
# --------------------------------------------------------------------------------------------


def _rkd_gram(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ec, g)``: the embeddings ``e`` (``B x D``) centred, in float64 (the relations only
    involve differences, so centring changes nothing but the rounding), and ``g = ec ec^T``."""
    dtype = torch.float32 if e.device.type == "mps" else torch.float64  # MPS has no float64
    e = e.to(dtype)
    ec = e - e.mean(dim=0, keepdim=True)
    return ec, ec @ ec.t()


def _through_gram(a_g: torch.Tensor, ec: torch.Tensor) -> torch.Tensor:
    """``dL/de`` from the symmetric ``a_g`` (``dL/dg`` plus its transpose) of ``g = ec ec^T``,
    ``ec`` the centred ``e``."""
    a_ec = a_g @ ec
    return a_ec - a_ec.mean(dim=0, keepdim=True)


def _rkd_relations(e: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(ec, g, h, r, d, live)`` of the embeddings ``e`` (``B x D``), float64 (:func:`_rkd_gram`).

    ``d[a, b] = ||e_a - e_b|| = sqrt(g_aa + g_bb - 2 g_ab)`` with the squared distance clamped
    at 1e-12 and the diagonal 0; ``live`` marks the off-diagonal pairs above the clamp (the
    ones a gradient reaches); ``r = 1 / d`` off the diagonal, 0 on it (``u_jj = 0``, as
    ``F.normalize`` of a zero vector); ``h[j, i] = g_ji - g_jj / 2``, so that ``<e_i - e_j, e_k -
    e_j> = g_ik - h_ji - h_jk``. Float64 keeps that difference exact enough for near-duplicate
    embeddings (float32 Gram entries would cancel to noise).
    """
    ec, g = _rkd_gram(e)
    sq = g.diagonal()
    off = ~torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    d2 = sq.unsqueeze(0) + sq.unsqueeze(1) - 2.0 * g
    live = (d2 >= 1e-12) & off
    d = d2.clamp(min=1e-12).sqrt() * off
    r = torch.where(off, 1.0 / d.clamp(min=1e-12), 0.0)
    h = g - 0.5 * sq.unsqueeze(1)
    return ec, g, h, r, d, live


def _rkd_angles(g: torch.Tensor, h: torch.Tensor, r: torch.Tensor, js: slice) -> torch.Tensor:
    """``psi[j, i, k] = <u_ij, u_kj> = (g_ik - h_ji - h_jk) r_ji r_jk`` for ``j`` in ``js``
    (float32, ``len(js) x B x B``); the cancelling sum is formed in ``g``'s dtype."""
    hj = h[js]
    m = g.unsqueeze(0) - hj.unsqueeze(2)
    m.sub_(hj.unsqueeze(1))
    m = m.float()
    rj = r[js].float()
    return m.mul_(rj.unsqueeze(2)).mul_(rj.unsqueeze(1))


def _rkd_angle_sums(student, teacher, mode: int) -> tuple[torch.Tensor, list]:
    """The angle term's total and sums (``kdbench.kernels.rkd_angle_sums``'s, in the order
    ``[gs, hs, ss, gt, ht, st]``; only the sides ``mode`` asks for are filled, the rest stay
    zero) in PyTorch, a block of anchors at a time (no ``B^3`` tensor is kept): the form for
    GPUs, MPS and a CPU without numba (the kernel's order of operations differs, and it forms
    ``psi`` in float64, so the two agree to rounding)."""
    (g_s, h_s, r_s), (g_t, h_t, r_t) = student, teacher
    batch, device = g_s.shape[0], g_s.device
    # ~64 MB blocks on a GPU; ~1 MB (a CPU cache) elsewhere
    elements = 2**24 if device.type == "cuda" else 2**18
    step = max(1, min(batch, elements // (batch * batch)))
    total = torch.zeros((), dtype=torch.float64, device=device)
    sums = [torch.zeros(batch, batch, device=device) for _ in range(6)]
    sides = ((r_s.float(), sums[:3]), (r_t.float(), sums[3:]))[:mode]
    for start in range(0, batch, step):
        js = slice(start, min(batch, start + step))
        psis = (_rkd_angles(g_s, h_s, r_s, js), _rkd_angles(g_t, h_t, r_t, js))
        x = psis[0] - psis[1]
        c = x.clamp(-1.0, 1.0)
        total += (c * (x - 0.5 * c)).sum(dtype=torch.float64)
        for (r32, (gg, hh, ss)), psi in zip(sides, psis, strict=False):
            ss[js] = (c * psi).sum(dim=2)
            q = c * r32[js].unsqueeze(2) * r32[js].unsqueeze(1)
            gg += q.sum(dim=0)
            hh[js] = q.sum(dim=2)
    return total, sums


def _cpu_kernels():
    """``kdbench.kernels`` (numba), or None where it cannot be loaded (numba missing, or no
    usable cache directory for its machine code): the PyTorch form then runs, with the same
    result, slower (a warning says so once)."""
    global _KERNELS
    if _KERNELS is False:
        try:
            from kdbench import kernels
        except Exception as exc:  # noqa: BLE001 - any failure leaves the PyTorch form
            import warnings

            warnings.warn(
                f"kdbench.kernels (numba) is unavailable ({type(exc).__name__}: {exc}); "
                "RKD runs in its PyTorch form on the CPU (same values, several times slower). "
                "Fix: pip install -c constraints.txt numba",
                RuntimeWarning,
                stacklevel=2,
            )
            kernels = None
        _KERNELS = kernels
    return _KERNELS


_KERNELS = False  # not looked up yet


def _rkd_backprop(ec, g, d, r, live, a_g, a_h, a_r, a_d) -> torch.Tensor:
    """``dL/de`` from ``dL/dg``, ``dL/dh``, ``dL/dr`` and ``dL/dd`` of :func:`_rkd_relations`'s
    outputs (each taken as independent): ``r = 1/d``, ``d = sqrt(d2)`` on the live pairs,
    ``d2_ab = g_aa + g_bb - 2 g_ab``, ``h_ji = g_ji - g_jj / 2``, ``g = ec ec^T`` and ``ec`` the
    centred ``e``."""
    a_d = a_d - a_r * r * r
    a_d2 = torch.where(live, a_d / (2.0 * d.clamp(min=1e-300)), 0.0)
    a_g = a_g + a_h - 2.0 * a_d2
    a_g.diagonal().add_(a_d2.sum(dim=1) + a_d2.sum(dim=0) - 0.5 * a_h.sum(dim=1))
    return _through_gram(a_g + a_g.t(), ec)


def _rkd_value_and_grads(e_s, e_t, distance_weight, angle_weight, mode):
    """RKD's value and gradients in closed form: ``(loss, dL/de_s, dL/de_t)``, the student's
    gradient with ``mode`` >= 1, the teacher's with ``mode`` 2 (else None). On the CPU the
    compiled form (``kdbench.kernels.rkd``), elsewhere
    :func:`_rkd_value_and_grads_torch`; the two agree to rounding (tests/test_losses.py)."""
    kernels = _cpu_kernels() if e_s.device.type == "cpu" else None
    if kernels is None:
        return _rkd_value_and_grads_torch(e_s, e_t, distance_weight, angle_weight, mode)
    (ec_s, g_s), (ec_t, g_t) = _rkd_gram(e_s), _rkd_gram(e_t)
    loss, sym = kernels.rkd(g_s.numpy(), g_t.numpy(), distance_weight, angle_weight, mode)
    ecs = (ec_s, ec_t)[:mode]
    grads = [_through_gram(torch.from_numpy(a), ec) for a, ec in zip(sym, ecs, strict=True)]
    return torch.tensor(loss), *(grads + [None, None])[:2]


def _rkd_value_and_grads_torch(e_s, e_t, distance_weight, angle_weight, mode):
    """:func:`_rkd_value_and_grads` in PyTorch (any device)."""
    batch = e_s.shape[0]
    pairs = batch * (batch - 1)  # the off-diagonal distances, all positive after the clamp
    ec_s, g_s, h_s, r_s, d_s, live_s = _rkd_relations(e_s)
    ec_t, g_t, h_t, r_t, d_t, live_t = _rkd_relations(e_t)
    mean_s, mean_t = d_s.sum() / pairs, d_t.sum() / pairs
    y = d_s / mean_s - d_t / mean_t
    c = y.clamp(-1.0, 1.0)
    loss = distance_weight * (c * (y - 0.5 * c)).sum() / batch**2
    if angle_weight:
        total, sums = _rkd_angle_sums((g_s, h_s, r_s), (g_t, h_t, r_t), mode)
        loss = loss + angle_weight * total.to(loss.device) / batch**3
    if mode == 0:
        return loss, None, None
    # dL/d(d / mean) = distance_weight * c / B^2 on the student side, minus that on the teacher's
    k_d, k_a = distance_weight / batch**2, angle_weight / batch**3
    grads = []
    for sign, ec, g, r, d, live, mean, part in (
        (1.0, ec_s, g_s, r_s, d_s, live_s, mean_s, 0),
        (-1.0, ec_t, g_t, r_t, d_t, live_t, mean_t, 3),
    )[:mode]:
        a_dn = sign * k_d * c
        a_d = a_dn / mean - (a_dn * d).sum() / (mean * mean * pairs)
        if angle_weight:
            gg, hh, ss = (x.to(device=g.device, dtype=g.dtype) for x in sums[part : part + 3])
            a_g, a_h, a_r = sign * k_a * gg, -2.0 * sign * k_a * hh, 2.0 * sign * k_a * d * ss
        else:
            a_g = a_h = a_r = torch.zeros_like(g)
        grads.append(_rkd_backprop(ec, g, d, r, live, a_g, a_h, a_r, a_d))
    return loss, grads[0], grads[1] if mode == 2 else None


class _RkdLoss(torch.autograd.Function):
    """RKD with its gradients formed in the forward pass (closed form, see
    :func:`_rkd_value_and_grads`): no autograd graph of ``B x B`` steps, and the angle term's
    ``B^3`` work is one pass (``kdbench.kernels``) on the CPU. Not twice differentiable."""

    @staticmethod
    def forward(ctx, e_s, e_t, distance_weight, angle_weight, both):
        mode = 2 if both else 1 if ctx.needs_input_grad[0] else 0
        # On the CPU the B x B steps around the kernel run on one thread: with every core busy
        # (other processes) a parallel region waits for a descheduled thread, which made an
        # online rkd epoch ~30x slower on a loaded machine (and at B = 128 a second thread
        # gains nothing on a quiet one)
        threads = torch.get_num_threads()
        single = e_s.device.type == "cpu" and threads > 1
        if single:
            torch.set_num_threads(1)
        try:
            loss, grad_s, grad_t = _rkd_value_and_grads(
                e_s, e_t, distance_weight, angle_weight, mode
            )
        finally:
            if single:
                torch.set_num_threads(threads)
        saved = [x.to(e_s.dtype) for x in (grad_s, grad_t) if x is not None]
        ctx.save_for_backward(*saved)
        ctx.mode = mode
        return loss.to(torch.float32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grads = [grad_output * x for x in ctx.saved_tensors]
        grad_s = grads[0] if ctx.mode >= 1 else None
        grad_t = grads[1] if ctx.mode == 2 else None
        return grad_s, grad_t, None, None, None


def rkd_loss(
    student_embedding: torch.Tensor,
    teacher_embedding: torch.Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    teacher_grad: bool = False,
) -> torch.Tensor:
    """Relational KD: ``distance_weight * L_D + angle_weight * L_A``.

    ``d_ij = ||e_i - e_j||`` (squared distance clamped at 1e-12 before the sqrt, diagonal 0)
    divided by the mean of the positive ``d_ij``; ``L_D = SmoothL1(d_s, d_t)`` (mean).
    ``psi_ijk = <u_ij, u_kj>``, ``u_ij = l2_normalize(e_i - e_j)``; ``L_A = SmoothL1(psi_s,
    psi_t)`` (mean). Embeddings are flattened to ``B x D``; no gradient reaches the teacher
    side.

    Computed from the Gram matrix ``e e^T`` (:func:`_rkd_relations`): ``O(B^2 D + B^3)`` time
    and ``O(B^2)`` memory instead of the direct form's ``O(B^3 D)`` and ``O(B^2 D)``, with the
    gradients in closed form (:class:`_RkdLoss`). The direct form normalises ``e_i - e_j`` by
    ``max(||e_i - e_j||, 1e-12)``; here the angle uses the same clamped distance as ``L_D``
    (``max(||e_i - e_j||, 1e-6)``), which only differs for pairs closer than 1e-6 (their angles
    are rounding noise either way; exact duplicates give ``psi = 0`` in both). Not twice
    differentiable.

    ``teacher_grad=True``: both sides get their gradients. The loss is symmetric in its two
    embeddings, so between two online peers A and B one call ``rkd_loss(A, B,
    teacher_grad=True)`` gives each peer exactly the gradient of its own direction
    (``rkd_loss(A, B.detach())`` for A, ``rkd_loss(B, A.detach())`` for B) at about half the
    cost of the two calls: each side's relations and angles are formed once.
    """
    if student_embedding.shape[0] != teacher_embedding.shape[0]:
        raise ValueError(
            "rkd_loss: student and teacher batch sizes differ: "
            f"{student_embedding.shape[0]} vs {teacher_embedding.shape[0]}"
        )
    batch = student_embedding.shape[0]
    if batch < 2:
        raise ValueError("rkd_loss: needs a batch of at least 2 samples")
    e_s = student_embedding.float().reshape(batch, -1)
    e_t = teacher_embedding.float().reshape(batch, -1)
    both = teacher_grad and torch.is_grad_enabled() and e_t.requires_grad
    return _RkdLoss.apply(
        e_s, e_t if both else e_t.detach(), float(distance_weight), float(angle_weight), both
    )


def pkt_loss(
    student_embedding: torch.Tensor, teacher_embedding: torch.Tensor, eps: float = 1e-7
) -> torch.Tensor:
    """PKT: ``mean_ij(P_t * log((P_t + eps) / (P_s + eps)))``.

    ``x_hat = x / (||x|| + eps)``, ``K = (x_hat x_hat^T + 1) / 2``, ``P = K / row sums of K``;
    embeddings are flattened to ``B x D``.
    """
    if student_embedding.shape[0] != teacher_embedding.shape[0]:
        raise ValueError(
            "pkt_loss: student and teacher batch sizes differ: "
            f"{student_embedding.shape[0]} vs {teacher_embedding.shape[0]}"
        )

    def conditional_probabilities(x: torch.Tensor) -> torch.Tensor:
        x = x.float().reshape(x.shape[0], -1)
        x = x / (x.norm(dim=1, keepdim=True) + eps)
        k = (x @ x.t() + 1.0) / 2.0
        return k / k.sum(dim=1, keepdim=True)

    p_s = conditional_probabilities(student_embedding)
    p_t = conditional_probabilities(teacher_embedding)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def sp_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Similarity preserving: ``||G_t - G_s||_F^2 / B^2``.

    ``G = normalize_rows(F F^T)`` with ``F`` the feature flattened to ``B x D``.
    """
    if student_feature.shape[0] != teacher_feature.shape[0]:
        raise ValueError(
            "sp_loss: student and teacher batch sizes differ: "
            f"{student_feature.shape[0]} vs {teacher_feature.shape[0]}"
        )
    batch = student_feature.shape[0]

    def similarity(f: torch.Tensor) -> torch.Tensor:
        f = f.float().reshape(batch, -1)
        return F.normalize(f @ f.t(), p=2.0, dim=1)

    return (similarity(teacher_feature) - similarity(student_feature)).pow(2).sum() / batch**2


def nst_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Neuron selectivity transfer: squared MMD with the kernel ``k(x, y) = (x^T y)^2``.

    Each channel's activations over the spatial positions are l2-normalised (``B x C x HW``);
    per sample, ``K(a, b) = (a b^T)^2`` (``C_a x C_b``) and
    ``L = mean_b[K(s, s).mean() + K(t, t).mean() - 2 K(s, t).mean()]``. The larger spatial map
    is adaptive-average-pooled to the smaller one first.
    """
    if student_feature.shape[0] != teacher_feature.shape[0]:
        raise ValueError(
            "nst_loss: student and teacher batch sizes differ: "
            f"{student_feature.shape[0]} vs {teacher_feature.shape[0]}"
        )
    f_s, f_t = _pool_to_common_size("nst_loss", student_feature.float(), teacher_feature.float())
    s = F.normalize(f_s.flatten(start_dim=2), p=2.0, dim=2)
    t = F.normalize(f_t.flatten(start_dim=2), p=2.0, dim=2)

    def kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()

    return kernel_mean(s, s) + kernel_mean(t, t) - 2.0 * kernel_mean(s, t)


# --------------------------------------------------------------------------------------------
# stateful losses (trainable parameters / buffers of their own)
# --------------------------------------------------------------------------------------------


def _conv1x1(spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    """Bias-free 1x1 convolution (``nn.Linear`` for vectors), as in the reference code."""
    if spatial_dims == 0:
        return nn.Linear(in_channels, out_channels, bias=False)
    conv = nn.Conv1d if spatial_dims == 1 else nn.Conv2d
    return conv(in_channels, out_channels, kernel_size=1, padding=0, bias=False)


class VIDLoss(nn.Module):
    """Variational information distillation (reference-code variant).

    ``mu = r(f_s)`` with ``r`` = conv1x1 -> ReLU -> conv1x1 -> ReLU -> conv1x1 (bias-free,
    ``student_channels -> mid -> mid -> teacher_channels``), a per-channel variance
    ``var_c = log(1 + exp(log_scale_c)) + eps`` with ``log_scale`` trainable and initialised to
    ``log(exp(init_pred_var - eps) - 1)`` (so the initial ``var_c`` is ``init_pred_var``), and
    ``L = mean(0.5 * ((mu - f_t)^2 / var + log(var)))`` over every element, ``var`` broadcast
    along the channel axis (dim 1).

    ``spatial_dims`` is 2 for ``B x C x H x W`` maps, 1 for ``B x C x L`` and 0 for ``B x C``
    vectors (the 1x1 convolutions are then linear layers). When the spatial sizes differ, the
    larger map is adaptive-average-pooled to the smaller one first. The regressor and
    ``log_scale`` are trained with the student and are not part of the deployed student.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        mid_channels: int | None = None,
        init_pred_var: float = 5.0,
        eps: float = 1e-5,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if spatial_dims not in (0, 1, 2):
            raise ValueError(f"VIDLoss: spatial_dims must be 0, 1 or 2, got {spatial_dims!r}")
        if not init_pred_var > eps:
            raise ValueError(f"VIDLoss: init_pred_var must be > eps ({eps}), got {init_pred_var!r}")
        mid = teacher_channels if mid_channels is None else mid_channels
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.spatial_dims = spatial_dims
        self.eps = eps
        self.regressor = nn.Sequential(
            _conv1x1(spatial_dims, student_channels, mid),
            nn.ReLU(),
            _conv1x1(spatial_dims, mid, mid),
            nn.ReLU(),
            _conv1x1(spatial_dims, mid, teacher_channels),
        )
        self.log_scale = nn.Parameter(
            torch.full((teacher_channels,), math.log(math.exp(init_pred_var - eps) - 1.0))
        )

    def forward(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        ndim = self.spatial_dims + 2
        if student_feature.dim() != ndim or teacher_feature.dim() != ndim:
            raise ValueError(
                f"VIDLoss: with spatial_dims={self.spatial_dims} both features must have "
                f"{ndim} dims, got shapes {tuple(student_feature.shape)} and "
                f"{tuple(teacher_feature.shape)}"
            )
        if student_feature.shape[0] != teacher_feature.shape[0]:
            raise ValueError(
                "VIDLoss: student and teacher batch sizes differ: "
                f"{student_feature.shape[0]} vs {teacher_feature.shape[0]}"
            )
        if student_feature.shape[1] != self.student_channels:
            raise ValueError(
                f"VIDLoss: expected {self.student_channels} student channels, "
                f"got shape {tuple(student_feature.shape)}"
            )
        if teacher_feature.shape[1] != self.teacher_channels:
            raise ValueError(
                f"VIDLoss: expected {self.teacher_channels} teacher channels, "
                f"got shape {tuple(teacher_feature.shape)}"
            )
        f_s, f_t = student_feature.float(), teacher_feature.float()
        if self.spatial_dims > 0:
            f_s, f_t = _pool_to_common_size("VIDLoss", f_s, f_t)
        mean = self.regressor(f_s).float()
        var = F.softplus(self.log_scale.float()) + self.eps
        var = var.view(1, -1, *([1] * self.spatial_dims))
        neg_log_prob = 0.5 * ((mean - f_t).pow(2) / var + torch.log(var))
        return neg_log_prob.mean()


class CRDLoss(nn.Module):
    """Contrastive representation distillation (reference-code variant).

    ``v_s = l2_normalize(embed_s(f_s))``, ``v_t = l2_normalize(embed_t(f_t))`` (linear heads to
    ``feat_dim``, inputs flattened to ``B x D``). Two memory banks (buffers, ``n_data x
    feat_dim``) hold one embedding per training sample: ``memory_s`` (student side) and
    ``memory_t`` (teacher side). With ``idx_i = [index_i, contrast_index_i]`` (positive first,
    then ``K`` negatives) and the bank rows taken without gradient:

    - ``out_s[i, j] = exp(<memory_t[idx_ij], v_s,i> / nce_t) / Z_s`` (student anchor),
    - ``out_t[i, j] = exp(<memory_s[idx_ij], v_t,i> / nce_t) / Z_t`` (teacher anchor),

    ``Z_s = mean(exp(...)) * n_data`` (likewise ``Z_t``) fixed from the first call and kept in
    the buffer ``z``. The NCE loss of each side, with ``m = K`` and noise ``Pn = 1 / n_data``:
    ``-(1/B) * sum_i [log(x_i0 / (x_i0 + m Pn + eps)) + sum_{j>=1} log(m Pn / (x_ij + m Pn +
    eps))]``; ``L = NCE(out_s) + NCE(out_t)``. After the loss, in training mode only, the
    anchors' bank rows are updated: ``memory[index] = l2_normalize(nce_m * memory[index] +
    (1 - nce_m) * v)``. The heads are trained with the student and are not part of the deployed
    student; negatives come from :meth:`sample_negatives`.
    """

    memory_s: torch.Tensor
    memory_t: torch.Tensor
    z: torch.Tensor

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        n_data: int,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
        eps: float = 1e-7,
    ) -> None:
        super().__init__()
        if n_data < 2:
            raise ValueError(f"CRDLoss: n_data must be >= 2, got {n_data!r}")
        if not nce_t > 0:
            raise ValueError(f"CRDLoss: nce_t must be > 0, got {nce_t!r}")
        self.n_data = n_data
        self.feat_dim = feat_dim
        self.nce_k = nce_k
        self.nce_t = nce_t
        self.nce_m = nce_m
        self.eps = eps
        self.embed_s = nn.Linear(student_dim, feat_dim)
        self.embed_t = nn.Linear(teacher_dim, feat_dim)
        stdv = 1.0 / math.sqrt(feat_dim / 3.0)
        self.register_buffer("memory_s", torch.rand(n_data, feat_dim) * 2 * stdv - stdv)
        self.register_buffer("memory_t", torch.rand(n_data, feat_dim) * 2 * stdv - stdv)
        self.register_buffer("z", torch.full((2,), -1.0))  # [Z_s, Z_t]; < 0 means "not set"

    def _nce(self, x: torch.Tensor) -> torch.Tensor:
        """NCE loss of one side; ``x`` is ``B x (K + 1)``, column 0 the positive."""
        batch, m = x.shape[0], x.shape[1] - 1
        noise = m / self.n_data  # m * Pn
        log_d1 = torch.log(x[:, 0] / (x[:, 0] + noise + self.eps))
        log_d0 = torch.log(noise / (x[:, 1:] + noise + self.eps))
        return -(log_d1.sum() + log_d0.sum()) / batch

    def forward(
        self,
        student_embedding: torch.Tensor,
        teacher_embedding: torch.Tensor,
        index: torch.Tensor,
        contrast_index: torch.Tensor,
    ) -> torch.Tensor:
        batch = student_embedding.shape[0]
        if teacher_embedding.shape[0] != batch:
            raise ValueError(
                "CRDLoss: student and teacher batch sizes differ: "
                f"{batch} vs {teacher_embedding.shape[0]}"
            )
        if index.shape != (batch,):
            raise ValueError(f"CRDLoss: index must have shape ({batch},), got {tuple(index.shape)}")
        if contrast_index.dim() != 2 or contrast_index.shape[0] != batch:
            raise ValueError(
                f"CRDLoss: contrast_index must be {batch} x K, got {tuple(contrast_index.shape)}"
            )
        f_s = student_embedding.float().reshape(batch, -1)
        f_t = teacher_embedding.float().reshape(batch, -1)
        v_s = F.normalize(self.embed_s(f_s).float(), p=2.0, dim=1)
        v_t = F.normalize(self.embed_t(f_t).float(), p=2.0, dim=1)

        index = index.long()
        idx = torch.cat([index[:, None], contrast_index.long()], dim=1)  # B x (K + 1)
        w_t = self.memory_t[idx].detach().float()  # B x (K + 1) x feat_dim
        w_s = self.memory_s[idx].detach().float()
        # exp(<w, v> / 0.07) amplifies rounding errors: keep the scores in float32 under autocast
        with torch.autocast(device_type=v_s.device.type, enabled=False):
            out_s = torch.exp(torch.bmm(w_t, v_s[:, :, None]).squeeze(2) / self.nce_t)
            out_t = torch.exp(torch.bmm(w_s, v_t[:, :, None]).squeeze(2) / self.nce_t)
        if bool(self.z[0] < 0) or bool(self.z[1] < 0):
            with torch.no_grad():
                self.z.copy_(torch.stack([out_s.mean(), out_t.mean()]) * self.n_data)
        z = self.z.detach()
        loss = self._nce(out_s / z[0]) + self._nce(out_t / z[1])

        if self.training:
            with torch.no_grad():
                for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                    updated = self.nce_m * memory[index] + (1.0 - self.nce_m) * v.detach()
                    memory.index_copy_(0, index, F.normalize(updated, p=2.0, dim=1))
        return loss

    @staticmethod
    def sample_negatives(
        index: torch.Tensor,
        labels: torch.Tensor | None,
        n_data: int,
        k: int,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw ``k`` negative sample indices in ``[0, n_data)`` per anchor (``B x k``), as the
        reference's ``mode='exact'`` (RepDistiller ``dataset/cifar100.py``
        ``CIFAR100InstanceSample``: ``np.random.choice(cls_negative[target], k, replace=k >
        len(cls_negative[target]))``): ``k`` *distinct* samples drawn uniformly from the anchor's
        candidates, with replacement only when there are fewer than ``k`` of them.

        A labelled anchor (``labels[index_i] >= 0``) draws from the samples whose label differs
        from its own (unlabelled samples, label -1, count as other); an unlabelled anchor (or any
        anchor when ``labels`` is None) from every sample except itself. Without replacement,
        each anchor's draw is the ``k`` largest of uniform random keys over the candidates (a
        uniform random ``k``-subset; one batched top-k, no per-anchor loop), on ``index``'s
        device (``generator`` must live on that device).
        """
        if index.dim() != 1:
            raise ValueError(f"sample_negatives: index must be 1-D, got {tuple(index.shape)}")
        if n_data < 2:
            raise ValueError(f"sample_negatives: n_data must be >= 2, got {n_data!r}")
        device = index.device
        index = index.long()
        if labels is not None:
            if labels.shape != (n_data,):
                raise ValueError(
                    f"sample_negatives: labels must have shape ({n_data},), "
                    f"got {tuple(labels.shape)}"
                )
            labels = labels.to(device=device, dtype=torch.long)

        def excluded(rows: torch.Tensor) -> torch.Tensor:
            """len(rows) x n_data: True where a sample may not be a negative of the anchor."""
            out = torch.zeros(rows.numel(), n_data, dtype=torch.bool, device=device)
            if labels is not None:
                own = labels[index[rows]]
                out |= (labels[None, :] == own[:, None]) & (own[:, None] >= 0)
            out[torch.arange(rows.numel(), device=device), index[rows]] = True  # the anchor
            return out

        out = torch.empty(index.shape[0], k, dtype=torch.long, device=device)
        # at most 2^24 random keys at a time (64 MB), whatever the data set's size
        for rows in torch.arange(index.shape[0], device=device).split(max(1, 2**24 // n_data)):
            mask = excluded(rows)
            n_candidates = n_data - mask.sum(1)
            if bool((n_candidates == 0).any()):
                c = labels[index[rows][n_candidates == 0][0]].item()
                raise ValueError(f"sample_negatives: every sample has the label {c}")
            distinct = n_candidates >= k
            if bool(distinct.any()):  # the reference sizes: a batched top-k of random keys
                sub = torch.nonzero(distinct).squeeze(1)
                keys = torch.rand(sub.numel(), n_data, generator=generator, device=device)
                keys.masked_fill_(mask[sub], -1.0)  # candidates' keys lie in [0, 1)
                out[rows[sub]] = keys.topk(k, dim=1, sorted=False).indices
            if not bool(distinct.all()):  # fewer than k candidates: uniform, with replacement
                sub = torch.nonzero(~distinct).squeeze(1)
                rank = torch.rand(
                    sub.numel(), k, generator=generator, device=device, dtype=torch.float64
                )
                rank = (rank * n_candidates[sub, None]).long()  # the rank-th candidate, from 0
                out[rows[sub]] = torch.searchsorted((~mask[sub]).cumsum(1), rank + 1)
        return out


# --------------------------------------------------------------------------------------------
# adversarial distillation (a discriminator D on logits or features; METHODS.md "Variants")
# --------------------------------------------------------------------------------------------
# D outputs one raw score d per sample (a logit: D(.) = sigmoid(d)); log D = -softplus(-d) and
# log(1 - D) = -softplus(d), computed that way for numerical stability.


def discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss, the negated GAN value (Goodfellow et al. 2014, eq. 1):
    ``-(mean_i log D(real_i) + mean_j log(1 - D(fake_j)))``, real = the teacher's outputs,
    fake = the student's (detached by the caller); ``d_*`` are D's raw scores (B or B x 1)."""
    d_real, d_fake = d_real.float().reshape(-1), d_fake.float().reshape(-1)
    return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()


def adversarial_generator_loss(d_fake: torch.Tensor, saturating: bool = False) -> torch.Tensor:
    """The student's adversarial loss on D's scores of its own outputs. Non-saturating
    (default; Goodfellow et al. 2014, Sec. 3: strong gradients while D wins):
    ``-mean_j log D(fake_j)``; saturating (the literal minimax objective):
    ``mean_j log(1 - D(fake_j))``."""
    d_fake = d_fake.float().reshape(-1)
    return -F.softplus(d_fake).mean() if saturating else F.softplus(-d_fake).mean()


def discriminator_accuracy(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """Share of samples D classifies right: real with ``D > 1/2`` (score > 0), fake with
    ``D < 1/2`` (score < 0), over all ``len(real) + len(fake)`` samples (0.5: D guesses)."""
    d_real, d_fake = d_real.detach().reshape(-1), d_fake.detach().reshape(-1)
    right = (d_real > 0).sum() + (d_fake < 0).sum()
    return right.float() / (d_real.numel() + d_fake.numel())


# --------------------------------------------------------------------------------------------
# data-free distillation: the generator's objective (DAFL, Chen et al. 2019) and DeepInversion's
# BatchNorm-statistics prior (Yin et al. 2020)
# --------------------------------------------------------------------------------------------


def dafl_one_hot_loss(teacher_logits: torch.Tensor) -> torch.Tensor:
    """DAFL's one-hot term: ``CE(z_T, argmax z_T)`` (mean over the batch): the teacher should
    be confident on generated samples."""
    z = teacher_logits.float()
    return F.cross_entropy(z, z.detach().argmax(1))


def dafl_activation_loss(teacher_features: torch.Tensor) -> torch.Tensor:
    """DAFL's activation term: ``-mean |f_T|`` over every element of the teacher's
    penultimate features (the reference code's ``-features_T.abs().mean()``; the paper writes
    ``-(1/n) sum_i ||f_T^i||_1``, the same up to the factor 1/feature-dim)."""
    return -teacher_features.float().abs().mean()


def dafl_entropy_loss(teacher_logits: torch.Tensor, base: float = 10.0) -> torch.Tensor:
    """DAFL's information-entropy term, the negated entropy of the batch's mean prediction:
    ``sum_c pbar_c log_base pbar_c`` with ``pbar = mean_i softmax(z_T,i)``; minimising it
    balances the classes of the generated batch. ``base`` 10 as the reference code
    (``torch.log10``); ``e`` gives the entropy in nats (1/ln 10 times larger)."""
    pbar = F.softmax(teacher_logits.float(), dim=1).mean(0)
    return (pbar * torch.log(pbar.clamp_min(1e-30))).sum() / math.log(base)


def bn_statistics_loss(
    x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor
) -> torch.Tensor:
    """DeepInversion's feature-statistics prior for one BatchNorm layer (Yin et al. 2020,
    "Dreaming to Distill"; NVlabs/DeepInversion ``DeepInversionFeatureHook``):
    ``||mu(x) - running_mean||_2 + ||sigma^2(x) - running_var||_2``, with ``x`` the layer's
    input (B x C x ...), mu and sigma^2 per channel over the batch and every position
    (biased variance, as the reference)."""
    x = x.float()
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims)
    var = x.var(dims, unbiased=False)
    return torch.linalg.vector_norm(mean - running_mean.float()) + torch.linalg.vector_norm(
        var - running_var.float()
    )


# --------------------------------------------------------------------------------------------
# self-distillation between the exits of one network (Be Your Own Teacher)
# --------------------------------------------------------------------------------------------


def byot_feature_loss(exit_feature: torch.Tensor, deepest_feature: torch.Tensor) -> torch.Tensor:
    """BYOT's hint term (Zhang et al. 2019, "Be Your Own Teacher", loss source 3):
    ``(1/B) * sum_b ||F_i,b - F_C,b||_2^2``, the squared L2 distance between a shallow exit's
    bottleneck feature and the deepest exit's feature, summed over the feature axes and
    averaged over the batch (the deepest feature detached by the caller)."""
    _check_same_shape("byot_feature_loss", exit_feature, deepest_feature)
    diff = exit_feature.float() - deepest_feature.float()
    return diff.pow(2).flatten(1).sum(1).mean()


def byot_loss(
    exit_logits: list[torch.Tensor],
    exit_features: list[torch.Tensor],
    labels: torch.Tensor,
    alpha: float = 0.3,
    temperature: float = 3.0,
    feature_weight: float = 0.03,
) -> torch.Tensor:
    """Be Your Own Teacher (Zhang et al. 2019) over the exits i = 1..C of one network, the last
    one the deepest (METHODS.md, "Variants of schemes and teachers"):

    ``sum_i [(1 - a) CE(q_i, y) + a T^2 KL(q_C^T || q_i^T) + l ||F_i - F_C||^2]``

    with ``a = alpha``, ``T = temperature``, ``l = feature_weight``; the deepest exit's
    softened prediction ``q_C^T`` and feature ``F_C`` are targets (detached), so the KL and
    hint terms of i = C vanish. CE is the mean over the labelled samples (label -1: none),
    KL as :func:`kd_loss` (batch mean, times T^2), the hint as :func:`byot_feature_loss`.
    ``scheme=byot`` builds the same sum from the method's terms (gamma = 1 - a, alpha = a)."""
    if len(exit_logits) != len(exit_features) or len(exit_logits) < 2:
        raise ValueError("byot_loss: give as many logits as features, for 2 or more exits")
    deep_z, deep_f = exit_logits[-1].detach(), exit_features[-1].detach()
    total = (1 - alpha) * F.cross_entropy(exit_logits[-1].float(), labels, ignore_index=-1)
    for z, f in zip(exit_logits[:-1], exit_features[:-1], strict=True):
        total = total + (1 - alpha) * F.cross_entropy(z.float(), labels, ignore_index=-1)
        total = total + alpha * kd_loss(z, deep_z, temperature)
        total = total + feature_weight * byot_feature_loss(f, deep_f)
    return total


# --------------------------------------------------------------------------------------------
# teacher-free and self-distillation targets, multi-teacher weights (METHODS.md "Variants")
# --------------------------------------------------------------------------------------------


TFKD_FORMS = ("reference", "kd")


def virtual_teacher_probs(
    labels: torch.Tensor, num_classes: int, correct_prob: float = 0.9
) -> torch.Tensor:
    """Tf-KD's virtual teacher (Yuan et al. 2020, "Revisiting Knowledge Distillation via Label
    Smoothing Regularization", Tf-KD_reg): ``p^d_c = a`` for the true class ``c = y`` and
    ``(1 - a) / (K - 1)`` for each of the ``K - 1`` others (B x K, float32). ``labels`` must be
    class indices (a label < 0 gives the row of class 0: the caller masks such rows)."""
    rest = (1.0 - correct_prob) / (num_classes - 1)
    probs = torch.full(
        (labels.shape[0], num_classes), rest, dtype=torch.float32, device=labels.device
    )
    return probs.scatter_(1, labels.clamp_min(0)[:, None], correct_prob)


def tfkd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    correct_prob: float = 0.99,
    temperature: float = 20.0,
    form: str = "reference",
) -> torch.Tensor:
    """Tf-KD_reg: the student distils the virtual teacher ``p^d`` of
    :func:`virtual_teacher_probs` (``a = correct_prob``, ``T = temperature``), per sample ``i``:

    - ``form="reference"`` (the authors' code, yuanli2333/Teacher-free-Knowledge-Distillation
      ``my_loss_function.loss_kd_regularization``, whose CIFAR-100 numbers it gives):
      ``(1/K) sum_c P_ic (log P_ic - log softmax(z_s,i)_c)`` with ``P_i = softmax(p^d_i / T)``
      (the probabilities softened as if they were logits, the student at T = 1, no T^2;
      ``nn.KLDivLoss()``'s default mean over all B x K elements, hence the 1/K);
    - ``form="kd"`` (METHODS.md: "distilled with KD at T"): Hinton KD of the distribution,
      ``T^2 KL(softmax(log p^d_i / T) || softmax(z_s,i / T))``, :func:`kd_loss` per sample.

    Averaged over the labelled samples (``labels >= 0``); unlabelled (transfer) samples have no
    true class, hence no virtual teacher, and are skipped (0 for a batch without labels)."""
    if form not in TFKD_FORMS:
        raise ValueError(f"tfkd_loss: form must be one of {TFKD_FORMS}, got {form!r}")
    _check_temperature("tfkd_loss", temperature)
    z = student_logits.float()
    p_d = virtual_teacher_probs(labels, z.shape[1], correct_prob)
    if form == "reference":
        log_t = F.log_softmax(p_d / temperature, dim=1)
        per_sample = (log_t.exp() * (log_t - F.log_softmax(z, dim=1))).sum(1) / z.shape[1]
    else:
        log_t = F.log_softmax(p_d.log() / temperature, dim=1)
        log_s = F.log_softmax(z / temperature, dim=1)
        per_sample = temperature**2 * (log_t.exp() * (log_t - log_s)).sum(1)
    labelled = (labels >= 0).float()
    return (per_sample * labelled).sum() / labelled.sum().clamp_min(1)


def pskd_targets(
    labels: torch.Tensor,
    prev_probs: torch.Tensor,
    alpha: float,
    has_prev: torch.Tensor | None = None,
) -> torch.Tensor:
    """PS-KD's soft targets (Kim et al. 2021, "Self-Knowledge Distillation with Progressive
    Refinement of Targets"): ``(1 - a_t) onehot(y) + a_t p^{t-1}`` with ``p^{t-1}`` the model's
    own earlier prediction of the sample (``prev_probs``, B x K probabilities); rows without one
    (``has_prev`` False) keep ``onehot(y)``, as the reference code's epoch 0. Rows with ``y < 0``
    (unlabelled) are zero."""
    onehot = F.one_hot(labels.clamp_min(0), prev_probs.shape[1]).float()
    mixed = (1.0 - alpha) * onehot + alpha * prev_probs.float()
    if has_prev is not None:
        mixed = torch.where(has_prev[:, None], mixed, onehot)
    return mixed * (labels >= 0).float()[:, None]


def pskd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    prev_probs: torch.Tensor,
    alpha: float,
    has_prev: torch.Tensor | None = None,
) -> torch.Tensor:
    """PS-KD: cross-entropy to :func:`pskd_targets`,
    ``(1/B_l) sum_{i labelled} -sum_c [(1 - a_t) y_ic + a_t p^{t-1}_ic] log softmax(z_i)_c``
    (the reference's ``(-targets * log_softmax(z)).mean(0).sum()``, over the labelled samples:
    unlabelled ones have no target here; 0 for a batch without labels)."""
    targets = pskd_targets(labels, prev_probs, alpha, has_prev)
    per_sample = -(targets * F.log_softmax(student_logits.float(), dim=1)).sum(1)
    return per_sample.sum() / (labels >= 0).sum().clamp_min(1)


def _pseudo_labels(member_logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The labels, with each unlabelled sample's (``y < 0``, or no labels at all) replaced by
    the ensemble's prediction: the argmax of the members' mean probability (T = 1)."""
    guess = member_logits.float().softmax(2).mean(1).argmax(1)
    return guess if labels is None else torch.where(labels >= 0, labels, guess)


def entropy_weights(member_logits: torch.Tensor) -> torch.Tensor:
    """Entropy-based multi-teacher weights (EBKD, Kwon et al. 2020, "Adaptive Knowledge
    Distillation Based on Entropy"), per sample: ``H_k = -sum_c p_kc log p_kc`` of member k's
    prediction ``p_k = softmax(z_k)`` (T = 1, as the CA-MKD repository's EBKD branch) and
    ``w_k = (1 - H_k / sum_j H_j) / (K - 1)``. METHODS.md's ``1 - H_k / sum_j H_j`` sums to
    ``K - 1``; divided by ``K - 1`` (as CA-MKD's weights are) the weights sum to 1 per sample,
    so ``alpha`` means the same for every weighting. ``member_logits``: B x K x C; returns
    B x K. Every member certain (all ``H = 0``): equal weights ``1/K``."""
    k = member_logits.shape[1]
    log_p = F.log_softmax(member_logits.float(), dim=2)
    h = -(log_p.exp() * log_p).sum(2)  # B x K
    total = h.sum(1, keepdim=True)
    w = (1.0 - h / total.clamp_min(1e-12)) / (k - 1)
    return torch.where(total > 1e-12, w, torch.full_like(w, 1.0 / k))


def ca_mkd_weights(member_logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Confidence-aware multi-teacher weights (CA-MKD, Zhang et al. 2022, "Confidence-Aware
    Multi-Teacher Knowledge Distillation", eq. 2), per sample: ``L_k = CE(z_k, y)`` of member k
    (T = 1) and ``w_k = (1 - softmax_k(L)_k) / (K - 1)``, which sum to 1: a member that is
    confidently right weighs most. Unlabelled samples (``y < 0``) take the ensemble's prediction
    as ``y`` (the argmax of the members' mean probability): weights by agreement with the
    ensemble. ``member_logits``: B x K x C; returns B x K."""
    b, k, c = member_logits.shape
    y = _pseudo_labels(member_logits, labels)
    z = member_logits.float()
    ce = F.cross_entropy(z.reshape(b * k, c), y.repeat_interleave(k), reduction="none")
    return (1.0 - ce.reshape(b, k).softmax(1)) / (k - 1)


def weighted_mixture_logits(
    member_logits: torch.Tensor, weights: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T log(sum_k w_k softmax(z_k / T))`` (B x C): logits whose softmax at T is the members'
    per-sample weighted mixture ``p_w = sum_k w_k p_k`` (weights summing to 1 per sample). With
    ``w_k = 1/K`` it is :class:`kdbench.teacher.EnsembleTeacher`'s mean. Training on it with
    :func:`kd_loss` gives the student the gradient of :func:`weighted_kd_loss`: the two differ
    by ``T^2 (1/B) sum_i [H(p_w,i) - sum_k w_ik H(p_ik)]``, which is free of the student."""
    _check_temperature("weighted_mixture_logits", temperature)
    probs = (member_logits.float() / temperature).softmax(2)
    mix = (weights.float()[:, :, None] * probs).sum(1)
    return temperature * mix.clamp_min(1e-12).log()


def weighted_kd_loss(
    student_logits: torch.Tensor,
    member_logits: torch.Tensor,
    weights: torch.Tensor,
    temperature: float = 4.0,
) -> torch.Tensor:
    """The multi-teacher KD term of METHODS.md: ``(1/B) sum_i sum_k w_ik T^2 KL(p_ik || q_i)``
    with ``p_ik = softmax(z_ik / T)``, ``q_i = softmax(z_s,i / T)`` (the CA-MKD repository's
    per-sample ``DistillKL(is_ca=True)`` weighted and summed; it further divides by K, i.e.
    an ``alpha`` K times smaller). kdbench trains with the same gradient through
    :func:`weighted_mixture_logits` (every logit method then sees one teacher distribution)."""
    _check_temperature("weighted_kd_loss", temperature)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)[:, None, :]
    log_p = F.log_softmax(member_logits.float() / temperature, dim=2)
    kl = (log_p.exp() * (log_p - log_q)).sum(2)  # B x K
    return temperature**2 * (weights.float() * kl).sum(1).mean()


# --------------------------------------------------------------------------------------------
# token-level distillation for text (issue #13): the caller passes one row per token that
# counts (padding dropped), so every row mean below is a per-token mean. P = the teacher's
# softmax(z_t / T), Q = the student's softmax(z_s / T), rows of logits ``N x V``.
# --------------------------------------------------------------------------------------------


def _check_fraction(name: str, key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: {key} must be in [0, 1], got {value!r}")


def _tempered_log_probs(
    name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log Q, log P)`` at temperature T, float32, the class axis at dim 1."""
    _check_logits(name, student_logits, teacher_logits)
    _check_temperature(name, temperature)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return log_q, log_p


def _kl_to_mixture(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """``KL(A || w A + (1 - w) B)`` per row (summed over dim 1, not reduced further).

    Written through ``d = log b - log a`` only: ``log m - log a = logaddexp(log w,
    log(1 - w) + d)``, which stays accurate when the mixture is close to ``A`` (w near 1) or to
    ``B`` (w near 0), where ``log m`` and ``log a`` taken separately would cancel. ``w = 0``
    gives ``KL(A || B)``, ``w = 1`` gives 0."""
    if w >= 1.0:
        return torch.zeros_like(log_a[:, 0])
    d = log_b - log_a
    if w <= 0.0:
        log_ratio = d
    else:
        log_ratio = torch.logaddexp(d + math.log1p(-w), torch.full_like(d, math.log(w)))
    return -(log_a.exp() * log_ratio).sum(dim=1)


def jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-Policy
    Distillation of Language Models: Learning from Self-Generated Mistakes"), scaled so that it
    is continuous in ``beta`` on [0, 1]:

    ``T^2 * (1/N) * sum_i JSD_beta(P_i || Q_i) / (beta (1 - beta))``, with
    ``M = beta P + (1 - beta) Q`` and ``JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M)``
    (P the teacher's, Q the student's softmax at T); a row mean, i.e. a per-token mean.

    GKD's value is this divided by ``T^2`` and multiplied by ``beta (1 - beta)``, which tends to
    0 at both ends; divided by it, the loss tends to the forward ``KL(P || Q)`` as beta -> 0
    and to the reverse ``KL(Q || P)`` as beta -> 1, and returns exactly those (as
    :func:`kd_loss` and :func:`reverse_kd_loss`) at beta 0 and 1 (TRL's ``generalized_jsd_loss``
    also returns the KLs at the ends but the unscaled JSD in between, a jump). The mixture is
    formed in log space (``logaddexp``), never as ``log(beta p + (1 - beta) q)``."""
    _check_fraction("jsd_loss", "beta", beta)
    log_q, log_p = _tempered_log_probs("jsd_loss", student_logits, teacher_logits, temperature)
    rows = student_logits.shape[0]
    if beta == 0.0:
        per_row = _kl_to_mixture(log_p, log_q, 0.0)
    elif beta == 1.0:
        per_row = _kl_to_mixture(log_q, log_p, 0.0)
    else:
        kl_p_m = _kl_to_mixture(log_p, log_q, beta)  # M = beta P + (1 - beta) Q
        kl_q_m = _kl_to_mixture(log_q, log_p, 1.0 - beta)
        per_row = (beta * kl_p_m + (1.0 - beta) * kl_q_m) / (beta * (1.0 - beta))
    return temperature**2 * per_row.sum() / rows


def skew_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Skew KL of DistiLLM (Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for
    Large Language Models"): ``T^2 * (1/N) * sum_i KL(P_i || alpha P_i + (1 - alpha) Q_i)``, a
    row (per-token) mean, times ``T^2`` as :func:`kd_loss`. ``alpha = 0`` is :func:`kd_loss`'s
    forward KL; the skew bounds the divergence where Q has little mass (DistiLLM's default
    alpha 0.1)."""
    _check_fraction("skew_kl_loss", "alpha", alpha)
    log_q, log_p = _tempered_log_probs("skew_kl_loss", student_logits, teacher_logits, temperature)
    rows = student_logits.shape[0]
    return temperature**2 * _kl_to_mixture(log_p, log_q, alpha).sum() / rows


def skew_reverse_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Skew reverse KL of DistiLLM (Ko et al. 2024):
    ``T^2 * (1/N) * sum_i KL(Q_i || (1 - alpha) P_i + alpha Q_i)``, a row (per-token) mean,
    times ``T^2`` as :func:`kd_loss`. ``alpha = 0`` is :func:`reverse_kd_loss`."""
    _check_fraction("skew_reverse_kl_loss", "alpha", alpha)
    log_q, log_p = _tempered_log_probs(
        "skew_reverse_kl_loss", student_logits, teacher_logits, temperature
    )
    rows = student_logits.shape[0]
    return temperature**2 * _kl_to_mixture(log_q, log_p, alpha).sum() / rows


def tvd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Total variation distance (as in Wen et al. 2023, "f-Divergence Minimization for
    Sequence-Level Knowledge Distillation"): ``(1/N) * sum_i 0.5 * sum_c |P_ic - Q_ic|``, a row
    (per-token) mean, in [0, 1]. Not scaled by ``T^2``: it is not a KL, and its gradient does
    not shrink as ``1/T^2``."""
    log_q, log_p = _tempered_log_probs("tvd_loss", student_logits, teacher_logits, temperature)
    rows = student_logits.shape[0]
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum() / rows


def _token_mask(name: str, mask: torch.Tensor | None, shape: torch.Size, device) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name}: mask must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask.bool()


def hidden_cosine_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """DistilBERT's cosine embedding loss (Sanh et al. 2019): ``1 - cos(h_s, h_t)`` per token,
    averaged over the tokens where ``mask`` is True: ``sum_{b,l: mask} (1 - cos) / #mask``.

    ``student_hidden`` and ``teacher_hidden``: ``B x L x H`` (any ``... x H``: the cosine over
    the last axis); ``mask``: ``B x L`` (the leading shape), None for every token. Masked
    tokens add nothing, whatever their values (0 for a mask without tokens)."""
    _check_same_shape("hidden_cosine_loss", student_hidden, teacher_hidden)
    s, t = student_hidden.float(), teacher_hidden.float()
    keep = _token_mask("hidden_cosine_loss", mask, s.shape[:-1], s.device)
    per_token = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    per_token = torch.where(keep, per_token, torch.zeros_like(per_token))
    return per_token.sum() / keep.sum().clamp_min(1)


def _relation_log_probs(
    values: torch.Tensor, key_ok: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log softmax(V V^T / sqrt(d_head))`` over the keys allowed by ``key_ok``
    (``B x 1 x L x L``), the rest -inf; returns the log probabilities and the probabilities."""
    v = values.float()
    scores = v @ v.transpose(-1, -2) / math.sqrt(v.shape[-1])
    log_r = F.log_softmax(scores.masked_fill(~key_ok, float("-inf")), dim=-1)
    return log_r, log_r.exp()


def minilm_loss(
    student_attn: torch.Tensor,
    teacher_attn: torch.Tensor,
    mask: torch.Tensor | None,
    student_values: torch.Tensor | None = None,
    teacher_values: torch.Tensor | None = None,
    causal: bool = True,
    eps: float = 1e-12,
) -> torch.Tensor:
    """MiniLM's deep self-attention distillation of the last layer (Wang et al. 2020,
    "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained
    Transformers"): ``AT + VR``.

    - Attention transfer: ``AT = (1 / (heads * #valid)) sum_{b, a, q valid} KL(A_t || A_s)``
      over the rows of the attention probabilities ``B x heads x L x L`` (query ``q``, keys on
      the last axis); ``log`` of a probability clamped at ``eps``, so the entries that both
      models mask (0 in both) add 0.
    - Value relation (when both value tensors ``B x heads x L x d_head`` are given; ``d_head``
      may differ between the models): ``VR = softmax(V V^T / sqrt(d_head))`` per head, keys
      beyond the query at -inf (``causal``; every key of an encoder);
      ``(1 / (heads * #valid)) sum_{b, a, q valid} KL(VR_t || VR_s)``.

    ``mask``: ``B x L``, True for the tokens that count (None: all); the means run over those
    query positions, and a padded query adds nothing. Student and teacher need as many heads
    (MiniLM pairs them one to one)."""
    for role, a in (("student", student_attn), ("teacher", teacher_attn)):
        if a.dim() != 4 or a.shape[-1] != a.shape[-2]:
            raise ValueError(
                f"minilm_loss: {role} attention must be B x heads x L x L, got {tuple(a.shape)}"
            )
    if student_attn.shape[1] != teacher_attn.shape[1]:
        raise ValueError(
            f"minilm_loss: the student has {student_attn.shape[1]} attention heads and the "
            f"teacher {teacher_attn.shape[1]}: MiniLM needs as many heads on both"
        )
    _check_same_shape("minilm_loss", student_attn, teacher_attn)
    batch, heads, length, _ = student_attn.shape
    keep = _token_mask("minilm_loss", mask, torch.Size((batch, length)), student_attn.device)
    count = heads * keep.sum().clamp_min(1)
    q_keep = keep[:, None, :]  # B x 1 x L over the query positions

    a_s, a_t = student_attn.float(), teacher_attn.float()
    kl_at = (a_t * (a_t.clamp_min(eps).log() - a_s.clamp_min(eps).log())).sum(-1)
    total = torch.where(q_keep, kl_at, torch.zeros_like(kl_at)).sum() / count

    if student_values is None or teacher_values is None:
        return total
    for role, v in (("student", student_values), ("teacher", teacher_values)):
        if v.dim() != 4 or tuple(v.shape[:3]) != (batch, heads, length):
            raise ValueError(
                f"minilm_loss: {role} values must be B x heads x L x d_head = "
                f"{(batch, heads, length)} x d_head, got {tuple(v.shape)}"
            )
    # Keys: every position (causal: up to the query). ``mask`` says which positions' *labels*
    # count (queries), not which inputs are padding: a prompt token is a real key of the answer
    # after it, and right padding never precedes a real query of a decoder.
    positions = torch.arange(length, device=student_attn.device)
    key_ok = torch.ones(1, 1, length, length, dtype=torch.bool, device=student_attn.device)
    if causal:
        key_ok = key_ok & (positions[None, :] <= positions[:, None])
    log_s, _ = _relation_log_probs(student_values, key_ok)
    log_t, r_t = _relation_log_probs(teacher_values, key_ok)
    zero = torch.zeros((), device=log_s.device)
    diff = torch.where(key_ok, log_t, zero) - torch.where(key_ok, log_s, zero)
    kl_vr = (torch.where(key_ok, r_t, zero) * diff).sum(-1)
    return total + torch.where(q_keep, kl_vr, torch.zeros_like(kl_vr)).sum() / count


def _check_topk(name: str, logits: torch.Tensor, k: int) -> None:
    vocab = logits.shape[-1]
    if not 1 <= k < vocab:
        raise ValueError(
            f"{name}: k must be in [1, {vocab - 1}] for a vocabulary of {vocab}, got {k!r} "
            "(k >= the vocabulary leaves no missing mass: distil the full logits)"
        )


def _buckets(log_probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[log p at index..., log(sum of the other p)]`` along the last axis (``... x (k+1)``);
    the rest bucket a logsumexp over the entries not in ``index`` (never ``log(1 - sum)``)."""
    top = log_probs.gather(-1, index)
    in_top = torch.zeros_like(log_probs, dtype=torch.bool).scatter_(-1, index, True)
    rest = torch.logsumexp(log_probs.masked_fill(in_top, float("-inf")), dim=-1, keepdim=True)
    return torch.cat([top, rest], dim=-1)


def topk_teacher_logits(
    teacher_logits: torch.Tensor, k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A black-box teacher that exposes only its top-``k`` tokens per position: the teacher's
    distribution ``P = softmax(z_t / T)`` over ``k + 1`` buckets, its ``k`` most probable tokens
    (in decreasing order) and one bucket with all the rest (the missing mass
    ``1 - sum_top-k P``, a logsumexp over the other tokens).

    Returns ``(bucket_logits, index)``: ``bucket_logits = T * log(bucket probabilities)``
    (``... x (k+1)``, float32, so ``softmax(bucket_logits / T)`` is the bucketed P) and the
    top-k token ids ``index`` (``... x k``, long). :func:`topk_student_logits` buckets the
    student the same way; any logit loss (:func:`kd_loss`, :func:`reverse_kd_loss`,
    :func:`jsd_loss`, ...) at the same T of the two bucket tensors is then the divergence
    between the bucketed distributions. Any leading shape ``... x V``; ``1 <= k < V``."""
    _check_temperature("topk_teacher_logits", temperature)
    _check_topk("topk_teacher_logits", teacher_logits, k)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    index = log_p.topk(k, dim=-1).indices
    return temperature * _buckets(log_p, index), index


def topk_student_logits(
    student_logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """The student's ``softmax(z_s / T)`` over the buckets of :func:`topk_teacher_logits`
    (the teacher's top-k tokens ``index``, then the rest), as ``T * log(bucket probabilities)``
    (``... x (k+1)``, float32, differentiable)."""
    _check_temperature("topk_student_logits", temperature)
    if index.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"topk_student_logits: index {tuple(index.shape)} does not match the logits "
            f"{tuple(student_logits.shape)} (same leading shape, k on the last axis)"
        )
    _check_topk("topk_student_logits", student_logits, index.shape[-1])
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return temperature * _buckets(log_q, index.long())
