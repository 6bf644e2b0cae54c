"""Teacher checkpoint files as users have them: kdbench's own, plain state dicts, and the
published CIFAR-100 teachers of the reference code.

Three layouts are read (always ``torch.load(..., weights_only=True)`` by the caller):

- a plain state dict (``torch.save(model.state_dict(), path)``);
- kdbench's own file, ``{'state_dict': ..., 'meta': {...}}`` (the trained-teacher cache);
- the reference code's, ``{'model': state_dict, 'epoch': ..., 'accuracy': ..., 'optimizer':
  ...}``: RepDistiller's ``train_teacher.py`` (``ckpt_epoch_240.pth``, the teachers its
  ``scripts/fetch_pretrained_teachers.sh`` downloads, and ``*_best.pth`` with ``best_acc``) and
  mdistiller, which loads the same files (``download_ckpts/cifar_teachers/*_vanilla/
  ckpt_epoch_240.pth``, read as ``load_checkpoint(path)["model"]``).

The reference networks (RepDistiller ``models/*.py``; mdistiller's ``models/cifar`` has the
same state-dict keys and shapes) are kdbench's zoo module for module, parameter for parameter;
only some module names differ. :data:`REFERENCE_KEYS` rewrites them per architecture (regular
expressions applied in order to each key; they leave kdbench's own names unchanged):

- resnet8 .. resnet110, resnet8x4, resnet32x4, vgg8 .. vgg19: the same names;
- resnet50 (``ResNet50``): ``layer1.0.shortcut.0.weight`` -> ``layer1.0.downsample.0.weight``,
  ``linear.weight`` -> ``fc.weight``;
- wrn_16_1 .. wrn_40_2: ``block1.layer.0.bn1.weight`` -> ``block1.0.bn1.weight``,
  ``block2.layer.0.convShortcut.weight`` -> ``block2.0.shortcut.weight``;
- mobilenetv2 (``MobileNetV2``): ``classifier.0.weight`` -> ``classifier.weight``;
- shufflev1, shufflev2 (``ShuffleV1``, ``ShuffleV2``): ``linear.weight`` -> ``fc.weight``.

With these names, each reference network's weights loaded into kdbench's network give the same
outputs (compared, when this table was written, for every architecture above with RepDistiller's
and mdistiller's model code; tests/test_published_checkpoints.py holds their key names).

A leading ``module.`` on every key (a model saved inside ``nn.DataParallel``) is dropped. The
mapped dict is then checked against the model key by key and shape by shape; the first
mismatch is named in a one-line error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from kdbench.errors import KdbenchError

_RESNET50 = (
    (r"^(layer\d+\.\d+)\.shortcut\.", r"\1.downsample."),
    (r"^linear\.", "fc."),
)
_WRN = (
    (r"^(block\d+)\.layer\.(\d+)\.", r"\1.\2."),
    (r"^(block\d+\.\d+)\.convShortcut\.", r"\1.shortcut."),
)
_LINEAR_TO_FC = ((r"^linear\.", "fc."),)

# kdbench arch -> (name in RepDistiller's / mdistiller's model dict, key rewrite rules)
REFERENCE_KEYS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    **{f"resnet{d}": (f"resnet{d}", ()) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": ("resnet8x4", ()),
    "resnet32x4": ("resnet32x4", ()),
    "resnet50": ("ResNet50", _RESNET50),
    **{f"wrn_{d}_{w}": (f"wrn_{d}_{w}", _WRN) for d in (16, 40) for w in (1, 2)},
    **{f"vgg{d}": (f"vgg{d}", ()) for d in (8, 11, 13, 16, 19)},
    "mobilenetv2": ("MobileNetV2", ((r"^classifier\.0\.", "classifier."),)),
    "shufflev1": ("ShuffleV1", _LINEAR_TO_FC),
    "shufflev2": ("ShuffleV2", _LINEAR_TO_FC),
}
_COMPILED = {
    arch: [(re.compile(pattern), repl) for pattern, repl in rules]
    for arch, (_, rules) in REFERENCE_KEYS.items()
}
# entries of a reference checkpoint worth keeping with the run's teacher info
_META_KEYS = ("epoch", "accuracy", "best_acc")


def reference_to_kdbench(key: str, arch: str) -> str:
    """The kdbench name of a reference state-dict key of ``arch`` (unchanged if none applies)."""
    for pattern, repl in _COMPILED.get(arch, ()):
        key = pattern.sub(repl, key)
    return key


def _is_state_dict(obj) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _scalar(value):
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return round(value.item(), 4)  # RepDistiller stores its accuracy as a 0-d CUDA tensor
    return value if isinstance(value, int | float | str | bool) else None


def split_checkpoint(obj, what: str) -> tuple[dict, dict]:
    """``(state_dict, meta)`` of a loaded checkpoint in any of the three layouts."""
    if isinstance(obj, Mapping) and _is_state_dict(obj.get("state_dict")):
        meta = obj.get("meta")
        return dict(obj["state_dict"]), dict(meta) if isinstance(meta, Mapping) else {}
    if isinstance(obj, Mapping) and _is_state_dict(obj.get("model")):
        meta = {k: _scalar(obj[k]) for k in _META_KEYS if k in obj}
        meta = {k: v for k, v in meta.items() if v is not None}
        return dict(obj["model"]), {"format": "reference", **meta}
    if _is_state_dict(obj):
        return dict(obj), {}
    found = sorted(map(str, obj))[:5] if isinstance(obj, Mapping) else type(obj).__name__
    raise KdbenchError(
        f"{what} holds no state dict (found {found}): save model.state_dict(), or give a "
        "RepDistiller/mdistiller checkpoint ({'model': state_dict, ...})"
    )


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(map(str, t.shape)) + ")"


def load_state(model: nn.Module, state: dict, arch: str, what: str) -> None:
    """Load ``state`` (kdbench or reference key names) into ``model`` after checking every key
    and shape; a one-line :class:`KdbenchError` names the first key that does not fit."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    mapped: dict[str, torch.Tensor] = {}
    original: dict[str, str] = {}
    for key, value in state.items():
        new = reference_to_kdbench(key, arch)
        mapped[new], original[new] = value, key

    def named(key: str) -> str:
        return key if original.get(key, key) == key else f"{original[key]} (here {key})"

    fix = "use a checkpoint of that architecture or set teacher.arch/teacher.kwargs to match it"
    head = f"{what} does not fit teacher.arch={arch}"
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in mapped:
            if key.endswith("num_batches_tracked"):
                continue  # older files lack it; BatchNorm fills it in
            raise KdbenchError(f"{head}: key {key} is missing from the file: {fix}")
        if tuple(mapped[key].shape) != tuple(value.shape):
            raise KdbenchError(
                f"{head}: key {named(key)} has shape {_shape(mapped[key])} in the file and "
                f"{_shape(value)} in the model: {fix}"
            )
    for key in mapped:
        if key not in expected:
            raise KdbenchError(f"{head}: key {named(key)} of the file is not in the model: {fix}")
    model.load_state_dict(mapped, strict=False)
