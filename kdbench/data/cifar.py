"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009), read from the official python-pickle archives in a
local directory (no download at run time).

``dataset.root`` is the extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``) or the
folder that holds it. 50000 train / 10000 test images of 3 x 32 x 32, stored as uint8. The
reference protocol (CRD, DKD) trains on all 50000 and reports the test set: ``val_size: 0``.
Training batches get a random 32 x 32 crop of the image padded by 4 and a horizontal flip (when
``augment``); every batch is normalised with the data set's channel mean and std.

The pickles are read with a restricted unpickler that builds numpy arrays and plain containers
only: a file in the directory cannot run code.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from kdbench.data.augment import random_crop, random_flip
from kdbench.data.base import ImageDataModule
from kdbench.errors import ConfigError, KdbenchError

_SPECS = {
    10: {
        "title": "CIFAR-10",
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "label_key": b"labels",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    },
    100: {
        "title": "CIFAR-100",
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "label_key": b"fine_labels",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    },
}

# globals a CIFAR pickle may name: numpy's array reconstruction (numpy 1 and 2 spellings)
_ALLOWED = {
    (mod, name)
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which CIFAR files do not")
        return super().find_class(module, name)


def _files(spec: dict) -> list[str]:
    return [*spec["train"], *spec["test"], spec["meta"]]


def locate(root: str | os.PathLike | None, num_classes: int) -> Path:
    """The extracted CIFAR folder under ``root`` (``root`` itself or its ``folder`` child);
    a one-line :class:`KdbenchError` if it is missing or incomplete."""
    spec = _SPECS[num_classes]
    how = (
        f"download and extract {spec['url']} and set dataset.root to the extracted "
        f"{spec['folder']} folder or the folder that holds it"
    )
    if root is None or str(root).strip() == "":
        raise KdbenchError(f"dataset.root is not set for {spec['title']}: {how}")
    base = Path(os.path.expanduser(str(root)))
    candidates = [base / spec["folder"], base]
    for folder in candidates:
        if all((folder / f).is_file() for f in _files(spec)):
            return folder
    files = ", ".join(_files(spec))
    partial = next(
        (c for c in candidates if c.is_dir() and any((c / f).exists() for f in _files(spec))),
        None,
    )
    if partial is None:
        what = f"{spec['title']} not found: neither {candidates[0]} nor {base} holds {files}"
    else:
        missing = ", ".join(f for f in _files(spec) if not (partial / f).is_file())
        what = f"{spec['title']} is incomplete: {partial} lacks {missing} (expected {files})"
    raise KdbenchError(f"{what}: {how}")


def read_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 of one pickle file."""
    spec = _SPECS[num_classes]
    label_key = spec["label_key"]

    def corrupt(why: str) -> KdbenchError:
        return KdbenchError(
            f"{spec['title']} file {path} is corrupt ({why}): download and extract "
            f"{spec['url']} again and set dataset.root to it"
        )

    try:
        with open(path, "rb") as f:
            d = _SafeUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise corrupt(f"not a readable pickle: {first[:200]}") from None
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        keys = sorted(d)[:6] if isinstance(d, dict) else type(d).__name__
        raise corrupt(f"expected a dict with keys b'data' and {label_key!r}, got {keys}")
    data, labels = d[b"data"], d[label_key]
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", type(data).__name__)
        raise corrupt(f"b'data' should be an N x 3072 array, got {shape}")
    if data.dtype != np.uint8:
        raise corrupt(f"b'data' should hold uint8 pixels, got {data.dtype}")
    try:
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise corrupt(f"{label_key!r} is not a list of integers") from None
    if len(y) != len(data):
        raise corrupt(f"{len(y)} labels for {len(data)} images")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise corrupt(f"labels outside 0..{num_classes - 1}")
    return np.array(data.reshape(-1, 3, 32, 32), dtype=np.uint8), y


class _CIFAR(ImageDataModule):
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(self, root: str | None = None, augment: bool = True, **kwargs) -> None:
        folder = locate(root, self.num_classes)  # cheap: checks that the files are there
        super().__init__(root=str(folder.resolve()), augment=bool(augment), **kwargs)
        self.folder = folder
        self.augment = bool(augment)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, 32, 32)

    def cache_key(self) -> dict:
        """The base key plus the size and mtime of each file (other data, another key) and the
        normalisation constants (a teacher trained on other inputs is another teacher)."""
        return {
            **super().cache_key(),
            "files": _fingerprint(self.folder, self.num_classes),
            "normalise": [list(self.mean), list(self.std)],  # what a cached teacher has seen
        }

    def generate(self) -> dict[str, np.ndarray]:
        spec = _SPECS[self.num_classes]
        folder = locate(self.folder, self.num_classes)
        out = {}
        for split, xk, yk in (("train", "x", "y"), ("test", "x_test", "y_test")):
            parts = [read_batch(folder / f, self.num_classes) for f in spec[split]]
            out[xk] = np.concatenate([p[0] for p in parts])
            out[yk] = np.concatenate([p[1] for p in parts])
        return out

    def train_augment(self, x: torch.Tensor) -> torch.Tensor:
        return random_flip(random_crop(x, 32, padding=4))


def _fingerprint(folder: Path, num_classes: int) -> list:
    out = []
    for f in _files(_SPECS[num_classes]):
        st = (folder / f).stat()
        out.append([f, st.st_size, st.st_mtime_ns])
    return out


class CIFAR10(_CIFAR):
    num_classes = 10
    # the per-channel mean and std of the 50000 training images (no CIFAR-10 run in the CRD /
    # DKD reference code to follow)
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


class CIFAR100(_CIFAR):
    num_classes = 100
    # the reference code's constants: RepDistiller dataset/cifar100.py and mdistiller
    # mdistiller/dataset/cifar100.py, transforms.Normalize((0.5071, 0.4867, 0.4408),
    # (0.2675, 0.2565, 0.2761))
    mean = (0.5071, 0.4867, 0.4408)
    std = (0.2675, 0.2565, 0.2761)


def write_fake_cifar(
    root: str | os.PathLike, num_classes: int, n_train: int, n_test: int, seed: int = 0
) -> Path:
    """Write a CIFAR-``num_classes`` folder in the official pickle format (the archive's folder
    name, under ``root``) with random pixels and labels; return the folder. For tests and smoke
    runs: ``dataset.root`` may point at ``root`` or at the returned folder."""
    if num_classes not in _SPECS:
        raise ConfigError("num_classes", num_classes, "CIFAR has 10 or 100 classes")
    spec = _SPECS[num_classes]
    folder = Path(root) / spec["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def batch(name: str, n: int) -> dict:
        d = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"filenames": [f"fake_{name}_{i:05d}.png".encode() for i in range(n)],
        }
        labels = [int(v) for v in rng.integers(0, num_classes, size=n)]
        if num_classes == 10:
            d[b"labels"] = labels
        else:
            d[b"fine_labels"] = labels
            d[b"coarse_labels"] = [v // 5 for v in labels]
        return d

    def dump(name: str, obj) -> None:
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)  # as the official archives (Python 2 cPickle)

    sizes = [len(a) for a in np.array_split(np.arange(n_train), len(spec["train"]))]
    for name, n in zip(spec["train"], sizes, strict=True):
        dump(name, batch(name, n))
    dump(spec["test"][0], batch(spec["test"][0], n_test))
    if num_classes == 10:
        meta = {
            b"label_names": [f"class{i}".encode() for i in range(10)],
            b"num_cases_per_batch": sizes[0],
            b"num_vis": 3072,
        }
    else:
        meta = {
            b"fine_label_names": [f"class{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"superclass{i}".encode() for i in range(20)],
        }
    dump(spec["meta"], meta)
    return folder
