"""Efficiency of a model, measured in-process: what the leaderboard compares besides accuracy.

Teacher and student are measured on the same device in the same process, one after the other:
parameters, state-dict size, FLOPs per sample (``torch.utils.flop_counter``), median latency at
batch 1 and throughput at a large batch.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def _logits(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def measure(
    model: nn.Module,
    input_shape: tuple[int, ...],
    device: str = "cpu",
    latency_runs: int = 50,
    throughput_batch: int = 1024,
    throughput_runs: int = 5,
    deployed: nn.Module | None = None,
) -> dict[str, float]:
    """Efficiency figures of ``model`` (called as ``model(x)``; ``deployed`` is what counts for
    parameters and size, by default ``model``)."""
    from torch.utils.flop_counter import FlopCounterMode

    deployed = deployed if deployed is not None else model
    was_training = model.training
    model.eval()
    params = sum(p.numel() for p in deployed.parameters())
    size = sum(t.numel() * t.element_size() for t in deployed.state_dict().values())
    x1 = torch.randn(1, *input_shape, device=device)
    with FlopCounterMode(display=False) as counter:
        _logits(model, x1)
    flops = counter.get_total_flops()
    for _ in range(5):  # warm-up
        _logits(model, x1)
    times = []
    for _ in range(latency_runs):
        start = time.perf_counter()
        _logits(model, x1)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    xb = torch.randn(throughput_batch, *input_shape, device=device)
    _logits(model, xb)
    start = time.perf_counter()
    for _ in range(throughput_runs):
        _logits(model, xb)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    throughput = throughput_batch * throughput_runs / (time.perf_counter() - start)
    model.train(was_training)
    return {
        "params": float(params),
        "size_mb": size / 2**20,
        "flops": float(flops),
        "latency_ms": 1000 * statistics.median(times),
        "throughput": throughput,
    }


def compare(student, teacher, input_shape, cfg) -> dict[str, float]:
    """``student/<figure>``, ``teacher/<figure>`` and the teacher/student ratios."""
    device = str(cfg.get("device", "cpu"))
    kw = dict(latency_runs=int(cfg.latency_runs), throughput_batch=int(cfg.throughput_batch))
    out: dict[str, float] = {}
    for role, tapped in (("student", student), ("teacher", teacher)):
        model = tapped.to(device)
        figures = measure(model, input_shape, device, deployed=tapped.model, **kw)
        out.update({f"{role}/{k}": v for k, v in figures.items()})
    out["speedup"] = out["teacher/latency_ms"] / out["student/latency_ms"]
    out["compression"] = out["teacher/params"] / out["student/params"]
    return out
