"""Efficiency of a model, measured in-process: what the leaderboard compares besides accuracy.

Teacher and student are measured on the same device in the same process: parameters, state-dict
size, FLOPs per sample (``torch.utils.flop_counter``), median latency at batch 1 (the two timed in
alternation) and throughput at a large batch.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def _logits(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def static_figures(model: nn.Module, deployed: nn.Module, input_shape) -> dict[str, float]:
    """Parameters and state-dict size of ``deployed``, FLOPs per sample of ``model(x)``."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter:
        _logits(model, torch.randn(1, *input_shape, device=device))
    size = sum(t.numel() * t.element_size() for t in deployed.state_dict().values())
    return {
        "params": int(sum(p.numel() for p in deployed.parameters())),
        "size_mb": size / 2**20,
        "flops": int(counter.get_total_flops()),
    }


@torch.no_grad()
def latencies(models: list, input_shape, device: str, runs: int) -> list[float]:
    """Median batch-1 latency (ms) of each model, timed in alternation so that a busy machine
    slows all of them alike and their ratio stays meaningful. On the CPU with one thread: at
    batch 1 a thread pool only adds synchronisation, which on a loaded machine can cost more than
    the whole forward pass."""
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        return _latencies(models, input_shape, device, runs)
    finally:
        torch.set_num_threads(threads)


def _latencies(models: list, input_shape, device: str, runs: int) -> list[float]:
    x = torch.randn(1, *input_shape, device=device)
    for m in models:
        for _ in range(5):  # warm-up
            _logits(m, x)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(runs):
        for i, m in enumerate(models):
            start = time.perf_counter()
            _logits(m, x)
            _sync(device)
            times[i].append(time.perf_counter() - start)
    return [1000 * statistics.median(t) for t in times]


@torch.no_grad()
def throughput(model: nn.Module, input_shape, device: str, batch: int, runs: int = 5) -> float:
    """Samples per second at a large batch."""
    x = torch.randn(batch, *input_shape, device=device)
    _logits(model, x)
    start = time.perf_counter()
    for _ in range(runs):
        _logits(model, x)
    _sync(device)
    return batch * runs / (time.perf_counter() - start)


def compare(student, teacher, input_shape, cfg) -> dict[str, float]:
    """``student/<figure>``, ``teacher/<figure>`` and the teacher/student ratios, both models
    measured on the same device in the same process."""
    device = str(cfg.get("device", "cpu"))
    models = {"student": student.to(device), "teacher": teacher.to(device)}
    modes = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    out: dict[str, float] = {}
    for role, m in models.items():
        out.update({f"{role}/{k}": v for k, v in static_figures(m, m.model, input_shape).items()})
        out[f"{role}/throughput"] = throughput(m, input_shape, device, int(cfg.throughput_batch))
    lat = latencies(list(models.values()), input_shape, device, int(cfg.latency_runs))
    out["student/latency_ms"], out["teacher/latency_ms"] = lat
    for k, m in models.items():
        m.train(modes[k])
    out["speedup"] = out["teacher/latency_ms"] / out["student/latency_ms"]
    out["compression"] = out["teacher/params"] / out["student/params"]
    return out
