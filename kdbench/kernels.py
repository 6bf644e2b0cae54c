"""Compiled CPU kernels (numba) for the losses whose eager PyTorch form is too slow on a CPU.

A loss in ``kdbench/losses.py`` calls a kernel from here on CPU tensors and keeps its own
PyTorch form for every other device (and for a machine without numba). A kernel is a plain
loop over NumPy arrays compiled once per machine (``cache=True`` keeps the machine code next to
this file, or in numba's user cache where that is read-only); it releases the GIL
(``nogil=True``), so :func:`run_split` runs its parts on several threads.

RKD's angle term (Park et al. 2019) is ``sum_jik SmoothL1(psi_s[j,i,k] - psi_t[j,i,k])`` over
``B^3`` triples: in eager PyTorch each of its ~25 elementwise steps is a pass over ``B^3``
values; here it is one pass (``scripts/perf.py --only flagship`` measures both).
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

# reassoc: the sums over k are vectorised (4 float64 lanes); no "fast" flag that would drop
# NaN/inf handling (a NaN embedding must still give a NaN loss)
_FASTMATH = {"reassoc", "contract", "nsz"}


@numba.njit(nogil=True, cache=True, fastmath=_FASTMATH, boundscheck=False)
def rkd_angle_sums(g_s, h_s, r_s, g_t, h_t, r_t, j0, j1, mode, gs, gt, hs, ht, ss, st):
    """RKD's angle term over the anchors ``j0 <= j < j1`` (float64 ``B x B`` arrays).

    ``psi[j,i,k] = (g[i,k] - h[j,i] - h[j,k]) r[j,i] r[j,k]`` on each side (``g``, ``h``, ``r``
    from ``kdbench.losses._rkd_relations``), ``x = psi_s - psi_t``, ``c = clamp(x, -1, 1)``.
    Returns ``sum SmoothL1(x) = sum c (x - c / 2)``. ``mode`` 1 also adds the student side's
    sums, 2 both sides' (``rr = r[j,i] r[j,k]``): ``gs[i,k] += sum_j c rr`` (accumulated
    across calls), ``hs[j,i] = sum_k c rr``, ``ss[j,i] = sum_k c psi`` (rows ``j`` written);
    ``gt``, ``ht``, ``st`` the same with the teacher side's ``rr`` and ``psi``. Mode 0 computes
    the value only.
    """
    batch = g_s.shape[0]
    total = 0.0
    for j in range(j0, j1):
        hs_j, ht_j, rs_j, rt_j = h_s[j], h_t[j], r_s[j], r_t[j]
        for i in range(batch):
            a_s, a_t, rs_i, rt_i = hs_j[i], ht_j[i], rs_j[i], rt_j[i]
            gs_row, gt_row = g_s[i], g_t[i]
            if mode == 0:
                for k in range(batch):
                    x = (gs_row[k] - a_s - hs_j[k]) * (rs_i * rs_j[k]) - (
                        gt_row[k] - a_t - ht_j[k]
                    ) * (rt_i * rt_j[k])
                    c = min(max(x, -1.0), 1.0)
                    total += c * (x - 0.5 * c)
                continue
            acc_gs = gs[i]
            sum_hs = 0.0
            sum_ss = 0.0
            if mode == 1:
                for k in range(batch):
                    rrs = rs_i * rs_j[k]
                    ps = (gs_row[k] - a_s - hs_j[k]) * rrs
                    x = ps - (gt_row[k] - a_t - ht_j[k]) * (rt_i * rt_j[k])
                    c = min(max(x, -1.0), 1.0)
                    total += c * (x - 0.5 * c)
                    sum_ss += c * ps
                    q = c * rrs
                    sum_hs += q
                    acc_gs[k] += q
            else:
                acc_gt = gt[i]
                sum_ht = 0.0
                sum_st = 0.0
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
                ht[j, i] = sum_ht
                st[j, i] = sum_st
            hs[j, i] = sum_hs
            ss[j, i] = sum_ss
    return total


_POOL: ThreadPoolExecutor | None = None
_POOL_KEY: tuple[int, int] | None = None
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads, made anew after a fork (a forked child has none of its
    parent's threads, and a pool that believes it has them would never run a task)."""
    global _POOL, _POOL_KEY
    key = (os.getpid(), workers)
    with _POOL_LOCK:
        if _POOL is None or _POOL_KEY != key:
            _POOL = ThreadPoolExecutor(workers, thread_name_prefix="kdbench-kernel")
            _POOL_KEY = key
        return _POOL


def run_split(part, items: int, threads: int, chunk: int) -> list:
    """``part(start, stop)`` over ``[0, items)`` in chunks of ``chunk``, on ``threads`` threads
    (this one and ``threads - 1`` pool threads) that each take the next chunk when they are
    free, so a thread the OS parks on a busy machine does not hold the others up. Returns each
    thread's results (a list of lists)."""
    chunks = [(a, min(items, a + chunk)) for a in range(0, items, chunk)]
    threads = max(1, min(threads, len(chunks)))
    order = itertools.count()  # next() on a count is atomic under the GIL

    def worker() -> list:
        out = []
        while (n := next(order)) < len(chunks):
            out.append(part(*chunks[n]))
        return out

    if threads == 1:
        return [worker()]
    futures = [_pool(threads - 1).submit(worker) for _ in range(threads - 1)]
    mine = worker()
    return [mine, *(f.result() for f in futures)]


@numba.njit(nogil=True, cache=True, fastmath=_FASTMATH, boundscheck=False)
def rkd_relations(g, h, r, d, live):
    """From ``g = ec ec^T`` (float64 ``B x B``, ``ec`` the centred embeddings) fill ``h[j, i] =
    g_ji - g_jj / 2``, ``d`` (the distances: ``sqrt(max(g_aa + g_bb - 2 g_ab, 1e-12))``, 0 on
    the diagonal), ``r = 1 / d`` (0 on the diagonal) and ``live`` (1 where the squared
    distance is above the clamp, off the diagonal). The CPU form of
    ``kdbench.losses._rkd_relations``."""
    batch = g.shape[0]
    for a in range(batch):
        for b in range(batch):
            h[a, b] = g[a, b] - 0.5 * g[a, a]
            if a == b:
                d[a, b] = 0.0
                r[a, b] = 0.0
                live[a, b] = 0
                continue
            d2 = g[b, b] + g[a, a] - 2.0 * g[a, b]
            live[a, b] = d2 >= 1e-12
            if d2 < 1e-12:  # written this way round so that a NaN stays NaN
                d2 = 1e-12
            d[a, b] = math.sqrt(d2)
            r[a, b] = 1.0 / d[a, b]


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
    diag = np.zeros(batch)
    for a in range(batch):
        for b in range(batch):
            a_h = -2.0 * k_a * hh[a, b]
            total_d = a_d[a, b] - 2.0 * k_a * d[a, b] * ss[a, b] * r[a, b] * r[a, b]
            a_d2 = total_d / (2.0 * d[a, b]) if live[a, b] else 0.0
            out[a, b] = k_a * gg[a, b] + a_h - 2.0 * a_d2
            diag[a] += a_d2 - 0.5 * a_h
            diag[b] += a_d2
    for a in range(batch):
        out[a, a] += diag[a]
    for a in range(batch):
        for b in range(a, batch):
            v = out[a, b] + out[b, a]
            out[a, b] = v
            out[b, a] = v


_WORKSPACES: dict[tuple[int, str, int], np.ndarray] = {}


def _workspace(name: str, shape: tuple[int, ...], dtype=np.float64) -> np.ndarray:
    """An array kept per calling thread, name and size (not zeroed): fresh arrays of these
    sizes would be new pages from the OS on every call, a cost as large as the arithmetic."""
    key = (threading.get_ident(), name, shape)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = _WORKSPACES[key] = np.empty(shape, dtype=dtype)
    return ws


def rkd_angle(sides, mode: int, threads: int) -> tuple[float, list[np.ndarray]]:
    """:func:`rkd_angle_sums` over every anchor: ``sides`` = ``((g, h, r), (g, h, r))``
    (student, teacher; float64 C-contiguous). Returns the total and ``[gs, hs, ss, gt, ht, st]``
    (zeros where ``mode`` leaves them out; views into this thread's workspace, valid until its
    next call). Threads split the anchors in chunks; every chunk has its own ``g``
    accumulators and total, summed in chunk order, so the result does not depend on which
    thread ran which chunk (runs stay reproducible)."""
    (g_s, h_s, r_s), (g_t, h_t, r_t) = sides
    batch = g_s.shape[0]
    # two chunks per thread: a thread the OS parks leaves its second chunk to the others;
    # every chunk costs a B x B accumulator pair (zeroed, then summed)
    chunk = -(-batch // (1 if threads <= 1 else min(16, 2 * threads)))
    chunks = -(-batch // chunk)
    ws = _workspace("angle", (2 * chunks + 4, batch, batch))
    ws.fill(0.0)
    hs, ht, ss, st = ws[-4], ws[-3], ws[-2], ws[-1]
    totals = [0.0] * chunks

    def part(j0: int, j1: int) -> None:
        n = j0 // chunk
        gs, gt = ws[2 * n], ws[2 * n + 1]
        totals[n] = rkd_angle_sums(
            g_s, h_s, r_s, g_t, h_t, r_t, j0, j1, mode, gs, gt, hs, ht, ss, st
        )

    run_split(part, batch, threads, chunk)
    accumulated = ws[: 2 * chunks].reshape(chunks, 2, batch, batch).sum(axis=0)
    return math.fsum(totals), [accumulated[0], hs, ss, accumulated[1], ht, st]


def rkd(g_s, g_t, distance_weight: float, angle_weight: float, mode: int, threads: int):
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
    sums = None
    if angle_weight:
        total, sums = rkd_angle(((g_s, h_s, r_s), (g_t, h_t, r_t)), mode, threads)
        loss += angle_weight * total / batch**3
    grads = []
    k_a = angle_weight / batch**3
    for n, (_, r, d, live, a_d, out) in enumerate(sides[:mode]):
        gg, hh, ss = sums[3 * n : 3 * n + 3] if sums is not None else np.zeros((3, batch, batch))
        rkd_gram_grad(d, r, live, a_d, gg, hh, ss, k_a if n == 0 else -k_a, out)
        grads.append(out)
    return loss, grads
