"""The frozen teacher's outputs over the distillation set, computed once and reused.

Offline distillation without random augmentation feeds the teacher the same samples every epoch,
so its outputs (logits, and the tapped features the method needs) are a function of the teacher's
weights, the data and the taps. They are computed in one pass at the start of a fit, kept on the
training device and indexed per batch by sample index, and saved under
``teacher_output_cache.dir`` keyed by a hash of all of that, so that every later run with the same
teacher, data and taps (other seeds, methods with the same taps, other students, tuning trials)
loads them instead of running the teacher. With augmentation on, the outputs depend on the random
view: no cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from kdbench.cachefile import atomic_write, read_or_none
from kdbench.taps import Outputs

CACHE_VERSION = 1


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(teacher, dm, taps: frozenset[str], device: torch.device) -> str:
    """Everything that determines the outputs: weights, data (and its view), taps, device type."""
    tap_paths = {t: getattr(teacher, "taps", {}).get(t) for t in sorted(taps)}
    ensemble = [getattr(teacher, "temperature", None), getattr(teacher, "feature_member", 0)]
    if getattr(teacher, "weighting", "mean") != "mean":  # the outputs hold each member's logits
        ensemble.append("members")
    if getattr(teacher, "topk", None):  # a top-K black box: K + 1 buckets at its temperature
        ensemble.append(f"top{teacher.topk}")
    what = {
        "version": CACHE_VERSION,
        "weights": weights_digest(teacher),
        "teacher": type(teacher).__name__,
        "ensemble": ensemble,
        "data": dm.cache_key(),
        "data_class": f"{type(dm).__module__}.{type(dm).__qualname__}",
        "transfer": bool(dm.use_transfer),
        "taps": tap_paths,
        "device": device.type,
    }
    digest = json.dumps(what, sort_keys=True, default=str).encode()
    return hashlib.sha256(digest).hexdigest()[:20]


def _tensors(out: Outputs):
    yield out.logits
    for v in out.features.values():
        yield from (v if isinstance(v, list) else [v])


def _cat(parts: list):
    if isinstance(parts[0], list):
        return [torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))]
    return torch.cat(parts)


def bytes_per_sample(out: Outputs) -> float:
    """What the cache holds per sample (per token for a language model: divide by its length)."""
    return sum(t.numel() * t.element_size() for t in _tensors(out)) / max(len(out.logits), 1)


def index(out: Outputs, idx: torch.Tensor) -> Outputs:
    """The cached outputs of the samples ``idx`` (``index_select``: on the CPU several times
    faster than ``t[idx]`` for a gather of rows)."""
    return out.map(lambda t: t.index_select(0, idx))


@torch.no_grad()
def compute(teacher, dm, ds, taps, device, limit_mb: float) -> Outputs | None:
    """One pass of the teacher (eval transform) over the distillation set ``ds``; None when the
    outputs would exceed ``limit_mb``."""
    chunks: list[Outputs] = []
    for i in range(0, len(ds), dm.eval_batch_size):
        x = dm.batch_transform(ds.x[i : i + dm.eval_batch_size].to(device), train=False)
        chunks.append(teacher(x, taps))
        if i == 0:
            per_sample = sum(t.numel() * t.element_size() for t in _tensors(chunks[0])) / len(x)
            if per_sample * len(ds) / 2**20 > limit_mb:
                return None
    return Outputs(
        torch.cat([c.logits for c in chunks]),
        {k: _cat([c.features[k] for c in chunks]) for k in chunks[0].features},
    )


def load(path: Path, device, n: int) -> Outputs | None:
    """The saved outputs at ``path`` (None if absent, unreadable or of another size)."""

    def read(p: Path) -> Outputs:
        # read into memory (not mmap: indexing a memory-mapped tensor every step is slower)
        obj = torch.load(p, map_location="cpu", weights_only=True)
        out = Outputs(obj["logits"], obj["features"])
        if len(out.logits) != n:
            raise ValueError(f"{len(out.logits)} samples, expected {n}")
        return out

    out = read_or_none(path, read, "teacher-output cache entry")
    if out is None:
        return None
    return out.map(lambda t: t.to(device)) if device.type != "cpu" else out


def save(path: Path, out: Outputs) -> None:
    """Atomic write: a crash leaves the old entry or none, never half of one. A cache that
    cannot be written is skipped with a notice (the run has the outputs in memory)."""
    cpu = out.map(torch.Tensor.cpu)
    obj = {"logits": cpu.logits, "features": cpu.features}
    atomic_write(path, lambda f: torch.save(obj, f), "teacher outputs")


def resolve(teacher, dm, taps, device, limit_mb: float, directory: str | None):
    """``(outputs or None, source)`` with source one of cached, computed, too_large."""
    path, ds = None, dm.distill_set()
    if directory:
        name = f"{dm.name}-{cache_key(teacher, dm, taps, device)}.pt"
        path = Path(os.path.expanduser(str(directory))) / name
        out = load(path, device, len(ds))
        if out is not None:
            return out, "cached"
    out = compute(teacher, dm, ds, taps, device, limit_mb)
    if out is None:
        return None, "too_large"
    if path is not None:
        save(path, out)
    return out, "computed"
