"""The teacher of an offline run: loaded from ``teacher.checkpoint`` or trained once and cached,
keyed by a hash of everything that determines it (architecture, data, training recipe, seed)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from kdbench.errors import KdbenchError

CACHE_VERSION = 1


def teacher_key(cfg, dm) -> str:
    what = {
        "version": CACHE_VERSION,
        "arch": cfg.teacher.arch,
        "kwargs": OmegaConf.to_container(cfg.teacher.kwargs, resolve=True),
        "data": dm.cache_key(),
        "batch_size": cfg.teacher.batch_size,
        "epochs": cfg.teacher.epochs,
        "optim": OmegaConf.to_container(cfg.teacher.optim, resolve=True),
        "seed": cfg.teacher.seed,
        "precision": str(cfg.trainer.get("precision", "32")),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def load_checkpoint(path: str | os.PathLike, model: nn.Module, arch: str) -> dict:
    """Load weights into ``model`` (``weights_only=True``: a checkpoint cannot run code)."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise KdbenchError(
            f"teacher.checkpoint={str(path)!r} does not exist: give the path of a saved state dict"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the user's file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KdbenchError(
            f"teacher.checkpoint={str(path)!r} is not a readable weights-only PyTorch checkpoint "
            f"({first[:200]}): save it with torch.save(model.state_dict(), path)"
        ) from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KdbenchError(
            f"teacher.checkpoint={str(path)!r} holds no state dict: save model.state_dict()"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        missing, unexpected = (
            set(model.state_dict()) - set(state),
            set(state) - set(model.state_dict()),
        )
        detail = (
            f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
            if missing or unexpected
            else str(exc).splitlines()[1].strip()[:200]
        )
        raise KdbenchError(
            f"teacher.checkpoint={str(path)!r} does not fit teacher.arch={arch} ({detail}): "
            "use a checkpoint of that architecture or set teacher.arch/teacher.kwargs to match it"
        ) from None
    return obj.get("meta", {}) if isinstance(obj, dict) else {}


def save_checkpoint(path: Path, model: nn.Module, meta: dict) -> None:
    """Write atomically: a crash leaves the old file or none, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def resolve_teacher(cfg, dm, model: nn.Module, train_fn) -> dict:
    """Fill ``model`` with the teacher's weights; return where they came from.

    ``train_fn(model)`` trains it from scratch (labelled data only) and returns metadata."""
    if cfg.teacher.get("checkpoint"):
        meta = load_checkpoint(cfg.teacher.checkpoint, model, cfg.teacher.arch)
        return {"source": "checkpoint", "path": str(cfg.teacher.checkpoint), **meta}
    path = (
        Path(os.path.expanduser(str(cfg.cache_dir)))
        / "teachers"
        / (f"{cfg.dataset.name}-{cfg.teacher.arch}-{teacher_key(cfg, dm)}.pt")
    )
    if path.exists():
        try:
            meta = load_checkpoint(path, model, cfg.teacher.arch)
            return {"source": "cache", "path": str(path), **meta}
        except KdbenchError as exc:
            print(f"kdbench: retraining the teacher over an unusable cache entry ({exc})")
    print(f"kdbench: training teacher {cfg.teacher.arch} (not cached yet; saved to {path})")
    meta = train_fn(model)
    save_checkpoint(path, model, meta)
    return {"source": "trained", "path": str(path), **meta}
