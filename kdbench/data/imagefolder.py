"""A folder of images in the ImageNet layout: ``root/train/<class>/*.jpg`` and
``root/val/<class>/*.jpg`` (classes: the sorted subfolder names of ``train/``; ``val/`` has the
same ones). ``val/`` is the test set; ``val_size`` carves a validation split out of ``train/``
(0: validate on ``val/``).

Images are decoded once with Pillow (RGB), resized so that the shorter side is ``resize_size``
and center-cropped to ``resize_size x resize_size``, and kept in memory as uint8: that takes
``3 * resize_size**2`` bytes per image (196 kB at 256), so this suits folders of up to some ten
thousand images (Imagenette, Tiny-ImageNet-sized sets), not ImageNet-1k. The decoded arrays are
cached in ``data_dir`` as one npz keyed by the folder, its file list (names, sizes, mtimes) and
the sizes, so a changed folder is decoded again.

Training batches: a random resized crop to ``image_size`` and a horizontal flip (when
``augment``); evaluation batches: the central ``image_size`` crop. Then normalisation with
``mean``/``std`` (ImageNet's by default).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from kdbench.data.augment import center_crop, random_flip, random_resized_crop
from kdbench.data.base import ImageDataModule
from kdbench.errors import ConfigError, KdbenchError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val")
_CACHE_FORMAT = 1


def decode(path: Path, size: int) -> np.ndarray:
    """``path`` as RGB, shorter side resized to ``size`` (bilinear, antialiased), central
    ``size x size`` crop, as uint8 ``(3, size, size)``."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def _subdirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


class ImageFolder(ImageDataModule):
    def __init__(
        self,
        root: str | None = None,
        image_size: int = 224,
        resize_size: int | None = None,
        augment: bool = True,
        mean: tuple[float, ...] | list[float] = IMAGENET_MEAN,
        std: tuple[float, ...] | list[float] = IMAGENET_STD,
        crop_scale: tuple[float, float] | list[float] = (0.08, 1.0),
        decode_threads: int = 0,
        **kwargs,
    ) -> None:
        image_size = int(image_size)
        if image_size < 1:
            raise ConfigError("dataset.image_size", image_size, "must be a positive integer")
        if resize_size is None:
            resize_size = round(image_size / 0.875)
        resize_size = int(resize_size)
        if resize_size < image_size:
            raise ConfigError(
                "dataset.resize_size",
                resize_size,
                f"must be >= dataset.image_size={image_size} (null: image_size / 0.875)",
            )
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError(
                "dataset.mean/std", (mean, std), "need 3 values each (RGB), std positive"
            )
        scale = tuple(float(v) for v in crop_scale)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(
                "dataset.crop_scale", list(scale), "must be [low, high] with 0 < low <= high <= 1"
            )
        folder = _check_root(root)  # cheap checks now: the folders, not the images
        classes = _classes(folder)
        super().__init__(
            root=str(folder.resolve()),
            image_size=image_size,
            resize_size=resize_size,
            augment=bool(augment),
            mean=list(mean),
            std=list(std),
            crop_scale=list(scale),
            **kwargs,
        )
        self.root, self.classes, self.num_classes = folder, classes, len(classes)
        self.image_size, self.resize_size = image_size, resize_size
        self.mean, self.std, self.crop_scale = mean, std, scale
        self.augment = bool(augment)
        self.decode_threads = int(decode_threads) or min(8, os.cpu_count() or 1)
        self._listing: dict[str, list[tuple[Path, int]]] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return (3, self.resize_size, self.resize_size)

    # -- files ----------------------------------------------------------------------------
    def listing(self) -> dict[str, list[tuple[Path, int]]]:
        """``(path, label)`` of every image, per split, sorted by class then path."""
        if self._listing is None:
            classes = _classes(self.root)
            if classes != self.classes:
                raise KdbenchError(
                    f"the class folders of {self.root / 'train'} changed while kdbench ran "
                    f"({len(self.classes)} at the start, {len(classes)} now): run again"
                )
            out: dict[str, list[tuple[Path, int]]] = {}
            for split in SPLITS:
                out[split] = []
                for label, name in enumerate(self.classes):
                    folder = self.root / split / name
                    files = sorted(
                        p
                        for p in folder.rglob("*")
                        if p.suffix.lower() in EXTENSIONS
                        and not p.name.startswith(".")
                        and p.is_file()
                    )
                    if not files:
                        raise KdbenchError(
                            f"image folder {folder} holds no images ({', '.join(EXTENSIONS)}): "
                            "add images of that class or remove the class from train/ and val/"
                        )
                    out[split].extend((p, label) for p in files)
            self._listing = out
        return self._listing

    def _digest(self) -> str:
        h = hashlib.sha256()
        for split, items in self.listing().items():
            for p, label in items:
                st = p.stat()
                rel = p.relative_to(self.root).as_posix()
                h.update(f"{split}\t{rel}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def cache_key(self) -> dict:
        """The base key plus a digest of the file list: another folder content, another key."""
        return {**super().cache_key(), "files": self._digest()}

    # -- arrays ---------------------------------------------------------------------------
    def generate(self) -> dict[str, np.ndarray]:
        self._listing = None  # list the folder afresh: a changed folder is decoded again
        what = {
            "format": _CACHE_FORMAT,
            "root": str(self.root.resolve()),
            "classes": self.classes,
            "files": self._digest(),
            "resize_size": self.resize_size,
        }
        return self.load_cached(what, self._decode_all)

    def _decode_all(self) -> dict[str, np.ndarray]:
        out = {}
        for split, xk, yk in (("train", "x", "y"), ("val", "x_test", "y_test")):
            items = self.listing()[split]
            out[xk] = self._decode_many([p for p, _ in items])
            out[yk] = np.array([label for _, label in items], dtype=np.int64)
        return out

    def _decode_many(self, paths: list[Path]) -> np.ndarray:
        r = self.resize_size
        x = np.empty((len(paths), 3, r, r), dtype=np.uint8)

        def one(i: int) -> None:  # Pillow releases the GIL while it decodes and resizes
            try:
                x[i] = decode(paths[i], r)
            except Exception as exc:  # noqa: BLE001 - any decoding failure: the user's file
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise KdbenchError(
                    f"cannot read image {paths[i]} ({type(exc).__name__}: {first[:200]}): "
                    "replace or remove the file"
                ) from None

        with ThreadPoolExecutor(self.decode_threads) as pool:
            list(pool.map(one, range(len(paths))))  # re-raises the first failure
        return x

    # -- batches ----------------------------------------------------------------------------
    def train_augment(self, x: torch.Tensor) -> torch.Tensor:
        return random_flip(random_resized_crop(x, self.image_size, scale=self.crop_scale))

    def eval_view(self, x: torch.Tensor) -> torch.Tensor:
        return center_crop(x, self.image_size)


def _check_root(root) -> Path:
    how = (
        "set dataset.root to a folder with train/<class>/ and val/<class>/ subfolders of images "
        "(or KDBENCH_IMAGEFOLDER_ROOT)"
    )
    if root is None or str(root).strip() == "":
        raise KdbenchError(f"dataset.root is not set for the image folder: {how}")
    path = Path(os.path.expanduser(str(root)))
    if not path.is_dir():
        raise KdbenchError(f"image folder dataset.root={str(path)!r} does not exist: {how}")
    for split in SPLITS:
        if not (path / split).is_dir():
            raise KdbenchError(f"image folder {path} has no {split}/ subfolder: {how}")
    return path


def _classes(root: Path) -> list[str]:
    train, val = _subdirs(root / "train"), _subdirs(root / "val")
    if not train:
        raise KdbenchError(
            f"image folder {root / 'train'} has no class subfolders: put the images of each "
            "class in train/<class>/ and val/<class>/"
        )
    if train != val:
        only_t, only_v = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise KdbenchError(
            f"image folder {root}: val/ and train/ have different class folders (only in "
            f"train/: {only_t[:5]}, only in val/: {only_v[:5]}): use the same class names in both"
        )
    if len(train) < 2:  # one class: every model is 100 % right, nothing to learn or compare
        raise ConfigError(
            "dataset.root",
            str(root),
            f"the image folder has {len(train)} class ({train[0]}): a classification needs at "
            "least 2 class subfolders in train/ and val/",
        )
    return train
