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


def example(input_shape, batch: int, device, dtype=torch.float32) -> torch.Tensor:
    """A batch of model input: Gaussian noise, or token id 1 everywhere for token models (the
    figures measured here do not depend on the values)."""
    if dtype.is_floating_point:
        return torch.randn(batch, *input_shape, device=device, dtype=dtype)
    return torch.ones(batch, *input_shape, device=device, dtype=dtype)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def static_figures(
    model: nn.Module, deployed: nn.Module, input_shape, dtype=torch.float32
) -> dict[str, float]:
    """Parameters and state-dict size of ``deployed``, FLOPs per sample of ``model(x)``."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter:
        _logits(model, example(input_shape, 1, device, dtype))
    size = sum(t.numel() * t.element_size() for t in deployed.state_dict().values())
    return {
        "params": int(sum(p.numel() for p in deployed.parameters())),
        "size_mb": size / 2**20,
        "flops": int(counter.get_total_flops()),
    }


@torch.no_grad()
def latencies(
    models: list, input_shape, device: str, runs: int, dtype=torch.float32
) -> list[float]:
    """Median batch-1 latency (ms) of each model, timed in alternation so that a busy machine
    slows all of them alike and their ratio stays meaningful. On the CPU with one thread: at
    batch 1 a thread pool only adds synchronisation, which on a loaded machine can cost more than
    the whole forward pass."""
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        return _latencies(models, input_shape, device, runs, dtype)
    finally:
        torch.set_num_threads(threads)


def _latencies(models: list, input_shape, device: str, runs: int, dtype) -> list[float]:
    x = example(input_shape, 1, device, dtype)
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
def throughput(
    model: nn.Module, input_shape, device: str, batch: int, runs: int = 5, dtype=torch.float32
) -> float:
    """Samples per second at a large batch."""
    x = example(input_shape, batch, device, dtype)
    _logits(model, x)
    start = time.perf_counter()
    for _ in range(runs):
        _logits(model, x)
    _sync(device)
    return batch * runs / (time.perf_counter() - start)


def compare(student, teacher, input_shape, cfg, dtype=torch.float32) -> dict[str, float]:
    """``student/<figure>``, ``teacher/<figure>`` and the teacher/student ratios, both models
    measured on the same device in the same process (``dtype``: of the model input)."""
    device = str(cfg.get("device", "cpu"))
    models = {"student": student.to(device), "teacher": teacher.to(device)}
    modes = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    out: dict[str, float] = {}
    for role, m in models.items():
        figures = static_figures(m, m.model, input_shape, dtype)
        out.update({f"{role}/{k}": v for k, v in figures.items()})
        batch = int(cfg.throughput_batch)
        out[f"{role}/throughput"] = throughput(m, input_shape, device, batch, dtype=dtype)
    lat = latencies(list(models.values()), input_shape, device, int(cfg.latency_runs), dtype)
    out["student/latency_ms"], out["teacher/latency_ms"] = lat
    for k, m in models.items():
        m.train(modes[k])
    out["speedup"] = out["teacher/latency_ms"] / out["student/latency_ms"]
    out["compression"] = out["teacher/params"] / out["student/params"]
    return out


@torch.no_grad()
def generation_figures(model: nn.Module, input_shape, device: str, cfg) -> dict[str, float]:
    """A language model's generation speed and memory: ``tokens_per_s`` (batch 1) and
    ``tokens_per_s_batched`` (``cfg.generation_batch`` sequences at once), each the new tokens
    of sampling ``cfg.generation_tokens`` tokens after an 8-token prompt, through the model's
    KV cache where it has one (:func:`kdbench.generate.generate`); ``kv_cache_mb``: the keys
    and values it holds for one sequence of the full context (float32), 0 without a cache."""
    from kdbench.generate import generate

    context = int(input_shape[0])
    new = max(1, min(int(cfg.get("generation_tokens", 64)), context - 8))
    out: dict[str, float] = {}
    for key, batch in (
        ("tokens_per_s", 1),
        ("tokens_per_s_batched", cfg.get("generation_batch", 32)),
    ):
        prompt = torch.ones(int(batch), 8, dtype=torch.long, device=device)
        generate(model, prompt[:, :4], 2, greedy=True)  # warm-up
        g = torch.Generator(device=device).manual_seed(0)
        start = time.perf_counter()
        generate(model, prompt, new, generator=g)
        _sync(device)
        out[key] = int(batch) * new / (time.perf_counter() - start)
    inner = getattr(model, "model", model)
    blocks = getattr(inner, "blocks", None)
    d_model = getattr(inner, "d_model", None)
    has_cache = hasattr(inner, "generate_step") and blocks is not None and d_model is not None
    out["kv_cache_mb"] = 2 * len(blocks) * context * d_model * 4 / 2**20 if has_cache else 0.0
    return out
