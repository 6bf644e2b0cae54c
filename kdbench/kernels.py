"""Compiled CPU kernels (numba) for the losses whose eager PyTorch form is too slow on a CPU.

A loss in ``kdbench/losses.py`` calls a kernel from here on CPU tensors and keeps its own
PyTorch form for every other device (and for a machine without numba). A kernel is a plain
loop over NumPy arrays compiled once per machine (``cache=True`` keeps the machine code next to
this file, or in numba's user cache where that is read-only). Kernels run on the calling
thread: a second thread was measured (``scripts/perf.py --only flagship``) to gain nothing
inside a training run, where torch's OpenMP workers keep spinning on the other cores between
the model's parallel operations; ``nogil=True`` still lets other Python threads run meanwhile.

RKD's angle term (Park et al. 2019) is ``sum_jik SmoothL1(psi_s[j,i,k] - psi_t[j,i,k])`` over
``B^3`` triples: in eager PyTorch each of its ~25 elementwise steps is a pass over ``B^3``
values; here it is one pass.
"""

from __future__ import annotations

import math
import threading

import numba
import numpy as np

# reassoc: the sums over k are vectorised (4 float64 lanes); no "fast" flag that would drop
# NaN/inf handling (a NaN embedding must still give a NaN loss)
_FASTMATH = {"reassoc", "contract", "nsz"}


@numba.njit(nogil=True, cache=True, fastmath=_FASTMATH, boundscheck=False)
def rkd_angle_sums(g_s, h_s, r_s, g_t, h_t, r_t, gs, gt, hs, ht, ss, st):
    """RKD's angle term over every anchor ``j`` (float64 ``B x B`` arrays).

    ``psi[j,i,k] = (g[i,k] - h[j,i] - h[j,k]) r[j,i] r[j,k]`` on each side (``g``, ``h``, ``r``
    from :func:`rkd_relations`), ``x = psi_s - psi_t``, ``c = clamp(x, -1, 1)``. Returns
    ``sum SmoothL1(x) = sum c (x - c / 2)`` and writes both sides' sums (``rr = r[j,i] r[j,k]``):
    ``gs[i,k] += sum_j c rr`` (``gs`` zeroed by the caller), ``hs[j,i] = sum_k c rr``,
    ``ss[j,i] = sum_k c psi``; ``gt``, ``ht``, ``st`` the same with the teacher side's ``rr`` and
    ``psi``. Always both sides: a loop without branches vectorises
    (4 float64 lanes), and one side alone would save only a third of it.
    """
    batch = g_s.shape[0]
    total = 0.0
    for j in range(batch):
        hs_j, ht_j, rs_j, rt_j = h_s[j], h_t[j], r_s[j], r_t[j]
        for i in range(batch):
            a_s, a_t, rs_i, rt_i = hs_j[i], ht_j[i], rs_j[i], rt_j[i]
            gs_row, gt_row, acc_gs, acc_gt = g_s[i], g_t[i], gs[i], gt[i]
            sum_hs = sum_ht = sum_ss = sum_st = 0.0
            for k in range(batch):
                rrs = rs_i * rs_j[k]
                rrt = rt_i * rt_j[k]
                ps = (gs_row[k] - a_s - hs_j[k]) * rrs
                pt = (gt_row[k] - a_t - ht_j[k]) * rrt
                x = ps - pt
                c = min(max(x, -1.0), 1.0)
                total += c * (x - 0.5 * c)
                sum_ss += c * ps
                sum_st += c * pt
                qs = c * rrs
                qt = c * rrt
                sum_hs += qs
                sum_ht += qt
                acc_gs[k] += qs
                acc_gt[k] += qt
            hs[j, i] = sum_hs
            ht[j, i] = sum_ht
            ss[j, i] = sum_ss
            st[j, i] = sum_st
    return total


@numba.njit(nogil=True, cache=True, fastmath=_FASTMATH, boundscheck=False)
def rkd_relations(g, h, r, d, live):
    """From ``g = ec ec^T`` (float64 ``B x B``, ``ec`` the centred embeddings) fill ``h[j, i] =
    g_ji - g_jj / 2``, ``d`` (the distances: ``sqrt(max(g_aa + g_bb - 2 g_ab, 1e-12))``, 0 on
    the diagonal), ``r = 1 / d`` (0 on the diagonal) and ``live`` (1 where the squared
    distance is above the clamp, off the diagonal). The CPU form of
    ``kdbench.losses._rkd_relations``."""
    batch = g.shape[0]
    sq = np.empty(batch)
    for a in range(batch):
        sq[a] = g[a, a]
    for a in range(batch):
        g_a, h_a, r_a, d_a, live_a, sq_a = g[a], h[a], r[a], d[a], live[a], sq[a]
        for b in range(batch):
            h_a[b] = g_a[b] - 0.5 * sq_a
            d2 = sq[b] + sq_a - 2.0 * g_a[b]
            live_a[b] = d2 >= 1e-12
            d2 = d2 if not d2 < 1e-12 else 1e-12  # a NaN stays NaN
            dist = math.sqrt(d2)
            d_a[b] = dist
            r_a[b] = 1.0 / dist
        d_a[a] = 0.0
        r_a[a] = 0.0
        live_a[a] = 0


@numba.njit(nogil=True, cache=True, fastmath=_FASTMATH, boundscheck=False)
def rkd_distance(d_s, d_t, weight, grads, a_d_s, a_d_t):
    """RKD's distance term ``weight * mean SmoothL1(d_s / mean_s - d_t / mean_t)`` (means over
    the ``B (B - 1)`` off-diagonal pairs); with ``grads`` (1: the student's, 2: both) its
    derivatives with respect to ``d_s`` and ``d_t`` go into ``a_d_s`` / ``a_d_t``."""
    batch = d_s.shape[0]
    pairs = batch * (batch - 1)
    mean_s = d_s.sum() / pairs
    mean_t = d_t.sum() / pairs
    k = weight / (batch * batch)
    value = 0.0
    dot_s = 0.0
    dot_t = 0.0
    for a in range(batch):
        for b in range(batch):
            y = d_s[a, b] / mean_s - d_t[a, b] / mean_t
            c = min(max(y, -1.0), 1.0)
            value += c * (y - 0.5 * c)
            a_d_s[a, b] = k * c
            dot_s += k * c * d_s[a, b]
            dot_t -= k * c * d_t[a, b]
    if grads == 0:
        return k * value
    for a in range(batch):
        for b in range(batch):
            c = a_d_s[a, b]
            a_d_s[a, b] = c / mean_s - dot_s / (mean_s * mean_s * pairs)
            if grads == 2:
                a_d_t[a, b] = -c / mean_t - dot_t / (mean_t * mean_t * pairs)
    return k * value


@numba.njit(nogil=True, cache=True, fastmath=_FASTMATH, boundscheck=False)
def rkd_gram_grad(d, r, live, a_d, gg, hh, ss, k_a, out):
    """``dL/dg`` made symmetric (``out``, so that ``dL/dec = out @ ec``) from ``a_d`` (``dL/dd``
    of the distance term) and the angle term's sums ``gg``, ``hh``, ``ss`` of one side
    (:func:`rkd_angle_sums`, scaled by ``k_a``: ``angle_weight / B^3``, negative for the
    teacher side): ``dL/dr = 2 k_a d ss``, ``dL/dh = -2 k_a hh``, ``dL/dg = k_a gg``;
    ``r = 1 / d``; ``d = sqrt(d2)`` on the live pairs; ``d2_ab = g_aa + g_bb - 2 g_ab``;
    ``h_ji = g_ji - g_jj / 2``. The CPU form of ``kdbench.losses._rkd_backprop``."""
    batch = d.shape[0]
    column = np.zeros(batch)  # sum over a of dL/dd2[a, b]
    row = np.empty(batch)  # sum over b of dL/dd2[a, b] - dL/dh[a, b] / 2
    for a in range(batch):
        d_a, r_a, live_a, a_d_a = d[a], r[a], live[a], a_d[a]
        gg_a, hh_a, ss_a, out_a = gg[a], hh[a], ss[a], out[a]
        acc = 0.0
        for b in range(batch):
            a_h = -2.0 * k_a * hh_a[b]
            total_d = a_d_a[b] - 2.0 * k_a * d_a[b] * ss_a[b] * r_a[b] * r_a[b]
            a_d2 = 0.5 * total_d * r_a[b] if live_a[b] else 0.0  # r = 1 / d where live
            out_a[b] = k_a * gg_a[b] + a_h - 2.0 * a_d2
            acc += a_d2 - 0.5 * a_h
            column[b] += a_d2
        row[a] = acc
    for a in range(batch):
        out[a, a] += row[a] + column[a]
    for a in range(batch):
        for b in range(a + 1, batch):
            v = out[a, b] + out[b, a]
            out[a, b] = v
            out[b, a] = v
        out[a, a] *= 2.0


_WORKSPACES: dict[tuple[int, str, tuple[int, ...]], np.ndarray] = {}


def _workspace(name: str, shape: tuple[int, ...], dtype=np.float64) -> np.ndarray:
    """An array kept per calling thread, name and size (not zeroed): fresh arrays of these
    sizes would be new pages from the OS on every call, a cost as large as the arithmetic."""
    key = (threading.get_ident(), name, shape)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = _WORKSPACES[key] = np.empty(shape, dtype=dtype)
    return ws


def rkd(g_s, g_t, distance_weight: float, angle_weight: float, mode: int):
    """RKD's value and symmetric ``dL/dg`` of each side that learns (``mode`` 1: the student,
    2: both; 0: the value only) from the Gram matrices of the centred embeddings (float64
    C-contiguous). Returns ``(loss, [A_s, A_t])`` with ``dL/dec = A @ ec`` (views into this
    thread's workspace, valid until its next call). The CPU form of
    ``kdbench.losses._rkd_value_and_grads``."""
    batch = g_s.shape[0]
    relations = _workspace("relations", (2, 5, batch, batch))  # h, r, d, dL/dd, dL/dg
    lives = _workspace("live", (2, batch, batch), np.uint8)
    sides = []
    for g, (h, r, d, a_d, out), live in zip((g_s, g_t), relations, lives, strict=True):
        rkd_relations(g, h, r, d, live)
        sides.append((h, r, d, live, a_d, out))
    (h_s, r_s, d_s, *_), (h_t, r_t, d_t, *_) = sides
    loss = rkd_distance(d_s, d_t, distance_weight, mode, sides[0][4], sides[1][4])
    sums = _workspace("angle", (6, batch, batch))  # gs, hs, ss, gt, ht, st
    if angle_weight:
        gs, hs, ss, gt, ht, st = sums
        gs.fill(0.0)  # accumulated over the anchors; the kernel writes every row of the rest
        gt.fill(0.0)
        total = rkd_angle_sums(g_s, h_s, r_s, g_t, h_t, r_t, gs, gt, hs, ht, ss, st)
        loss += angle_weight * total / batch**3
    else:
        sums.fill(0.0)
    grads = []
    k_a = angle_weight / batch**3
    for n, (_, r, d, live, a_d, out) in enumerate(sides[:mode]):
        gg, hh, ss = sums[3 * n : 3 * n + 3]
        rkd_gram_grad(d, r, live, a_d, gg, hh, ss, k_a if n == 0 else -k_a, out)
        grads.append(out)
    return loss, grads
