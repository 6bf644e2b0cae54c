"""Image data: CIFAR pickles, image folders, batched augmentation and the batch_transform hook."""

from __future__ import annotations

import os
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose
from PIL import Image

import kdbench.data.cifar as cifar
import kdbench.data.imagefolder as imagefolder
from kdbench.data import augment as A
from kdbench.data.cifar import CIFAR10, CIFAR100, write_fake_cifar
from kdbench.data.digits import Digits
from kdbench.data.imagefolder import ImageFolder
from kdbench.errors import ConfigError, KdbenchError, checked_instantiate

URL10 = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
URL100 = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


def _cifar(cls, root, tmp_path, **kw):
    args = dict(name=cls.__name__.lower(), data_dir=str(tmp_path / "cache"), batch_size=16)
    return cls(root=str(root), **{**args, **kw})


def _read_pickles(folder, names, label_key):
    xs, ys = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        xs.append(d[b"data"].reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key]))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# -- CIFAR ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "k, cls, folder, train_files, test_file, label_key",
    [
        (100, CIFAR100, "cifar-100-python", ["train"], "test", b"fine_labels"),
        (
            10,
            CIFAR10,
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            "test_batch",
            b"labels",
        ),
    ],
)
def test_fake_cifar_round_trip(tmp_path, k, cls, folder, train_files, test_file, label_key):
    written = write_fake_cifar(tmp_path / "raw", k, n_train=60, n_test=25, seed=3)
    assert written == tmp_path / "raw" / folder
    x, y = _read_pickles(written, train_files, label_key)
    x_test, y_test = _read_pickles(written, [test_file], label_key)
    assert x.shape == (60, 3, 32, 32) and len(x_test) == 25
    assert y.min() >= 0 and y.max() < k and len(set(y.tolist())) > 5

    dm = _cifar(cls, tmp_path / "raw", tmp_path, val_size=0)  # the parent of the folder
    assert dm.num_classes == k and dm.input_shape == (3, 32, 32) and dm.augment
    dm.prepare_data()
    dm.setup()
    assert dm.train_x.dtype == torch.uint8 and dm.train_x.shape == (60, 3, 32, 32)
    assert torch.equal(dm.train_x, x) and torch.equal(dm.train_y, y)
    assert torch.equal(dm.test_x, x_test) and torch.equal(dm.test_y, y_test)

    # training batches: the stored (untransformed) samples their index addresses
    seen = []
    for xb, yb, idx in dm.train_dataloader():
        assert xb.dtype == torch.uint8
        assert torch.equal(dm.train_x[idx], xb) and torch.equal(dm.train_y[idx], yb)
        seen += idx.tolist()
    assert sorted(seen) == list(range(60)) and seen != list(range(60))  # shuffled, all once
    # val_size=0: the validation loader serves the test set
    vx, vy = zip(*[(b[0], b[1]) for b in dm.val_dataloader()], strict=True)
    assert torch.equal(torch.cat(vx), x_test) and torch.equal(torch.cat(vy), y_test)

    # the folder itself works as root too; val_size > 0 carves a split out of train
    dm2 = _cifar(cls, written, tmp_path, val_size=10)
    dm2.setup()
    assert len(dm2.train_x) == 50 and len(dm2.val_x) == 10 and len(dm2.test_x) == 25
    both = torch.cat([dm2.train_x, dm2.val_x]).flatten(1)
    assert sorted(map(bytes, both.numpy())) == sorted(map(bytes, x.flatten(1).numpy()))


def test_cifar_construction_checks_files_but_reads_nothing(tmp_path, monkeypatch):
    write_fake_cifar(tmp_path, 100, 20, 10)
    calls = []
    real = cifar.read_batch
    monkeypatch.setattr(cifar, "read_batch", lambda *a: calls.append(a) or real(*a))
    dm = _cifar(CIFAR100, tmp_path, tmp_path, val_size=0)
    assert calls == []
    dm.setup()
    assert len(calls) == 2  # train and test
    with pytest.raises(ConfigError, match="cannot generate unlabelled samples"):
        _cifar(CIFAR100, tmp_path, tmp_path, transfer_size=5)
    with pytest.raises(ConfigError, match="val_size"):
        _cifar(CIFAR100, tmp_path, tmp_path, val_size=-1)


def test_cifar_missing_directory_or_file(tmp_path):
    with pytest.raises(KdbenchError) as exc:
        _cifar(CIFAR10, tmp_path / "nowhere", tmp_path)
    msg = _one_line(exc)
    for part in ("data_batch_1", "data_batch_5", "test_batch", "batches.meta", URL10):
        assert part in msg
    assert str(tmp_path / "nowhere") in msg and "dataset.root" in msg

    folder = write_fake_cifar(tmp_path, 10, 20, 10)
    (folder / "data_batch_3").unlink()
    with pytest.raises(KdbenchError) as exc:
        _cifar(CIFAR10, tmp_path, tmp_path)
    msg = _one_line(exc)
    assert "lacks data_batch_3 " in msg and str(folder) in msg and URL10 in msg

    with pytest.raises(KdbenchError) as exc:
        _cifar(CIFAR100, tmp_path, tmp_path)  # a CIFAR-10 folder is no CIFAR-100 folder
    msg = _one_line(exc)
    assert "train, test, meta" in msg and URL100 in msg and "dataset.root" in msg

    with pytest.raises(KdbenchError, match="dataset.root is not set"):
        CIFAR100(root=None, name="cifar100", data_dir=str(tmp_path))


def _write(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def test_cifar_corrupt_pickles(tmp_path):
    folder = write_fake_cifar(tmp_path, 100, 20, 10)
    train = folder / "train"
    good = train.read_bytes()

    def error() -> str:
        dm = _cifar(CIFAR100, tmp_path, tmp_path)  # the files are there: construction passes
        with pytest.raises(KdbenchError) as exc:
            dm.setup()
        msg = _one_line(exc)
        assert str(train) in msg and URL100 in msg
        return msg

    train.write_bytes(good[: len(good) // 2])  # truncated
    assert "not a readable pickle" in error()

    d = pickle.loads(good, encoding="bytes")
    _write(train, {**d, b"data": d[b"data"][:, :100]})
    assert "N x 3072" in error()
    _write(train, {**d, b"fine_labels": d[b"fine_labels"][:-1]})
    assert "19 labels for 20 images" in error()
    _write(train, {**d, b"fine_labels": [100] * 20})
    assert "labels outside 0..99" in error()
    _write(train, [1, 2, 3])
    assert "expected a dict" in error()

    # a pickle that would run code is refused, and the code does not run
    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "pwned"),))

    _write(train, {b"data": Evil()})
    assert "posix.mkdir" in error() or "nt.mkdir" in error()
    assert not (tmp_path / "pwned").exists()


def test_cifar_configs_compose(tmp_path, monkeypatch):
    write_fake_cifar(tmp_path, 10, 20, 10)
    write_fake_cifar(tmp_path, 100, 20, 10)
    for name, cls in (("cifar10", CIFAR10), ("cifar100", CIFAR100)):
        cfg = compose(f"dataset={name}", f"dataset.root={tmp_path}", tiny=False)
        dm = checked_instantiate(cfg.dataset, _convert_="all")
        assert type(dm) is cls and dm.val_size == 0 and dm.augment and dm.batch_size == 64
        assert dm.eval_batch_size == 512 and dm.transfer_size == 0
    monkeypatch.setenv("KDBENCH_CIFAR_ROOT", str(tmp_path))
    cfg = compose("dataset=cifar100", tiny=False)
    assert type(checked_instantiate(cfg.dataset, _convert_="all")) is CIFAR100
    cfg = compose("dataset=cifar100", f"dataset.root={tmp_path / 'none'}", tiny=False)
    with pytest.raises(KdbenchError, match="cifar-100-python.tar.gz"):
        checked_instantiate(cfg.dataset, _convert_="all")
    monkeypatch.delenv("KDBENCH_IMAGEFOLDER_ROOT", raising=False)
    cfg = compose("dataset=imagefolder", tiny=False)
    with pytest.raises(KdbenchError, match="dataset.root is not set"):
        checked_instantiate(cfg.dataset, _convert_="all")


# -- augmentation ---------------------------------------------------------------------------
def _window_offsets(out, padded, h, w):
    """For each sample, the offsets (i, j) whose window of ``padded`` equals the output."""
    H, W = padded.shape[-2:]
    found = []
    for n in range(len(out)):
        hits = [
            (i, j)
            for i in range(H - h + 1)
            for j in range(W - w + 1)
            if torch.allclose(padded[n, :, i : i + h, j : j + w].float(), out[n].float(), atol=1e-5)
        ]
        found.append(hits)
    return found


def test_random_crop_is_a_shifted_window_of_the_padded_input():
    torch.manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = A.random_crop(x, 8, padding=2)
    assert out.shape == x.shape and out.dtype == torch.uint8
    hits = _window_offsets(out, F.pad(x, (2, 2, 2, 2)), 8, 8)
    assert all(len(h) == 1 for h in hits)  # exactly one window each (random pixels)
    offsets = [h[0] for h in hits]
    assert len(set(offsets)) > 12  # 25 possible offsets, drawn per sample
    assert (out == 0).any()  # the zero padding shows
    assert A.random_crop(x, (4, 6)).shape == (64, 3, 4, 6)
    # the same seed, the same crops; a generator makes its own stream
    torch.manual_seed(7)
    a = A.random_crop(x, 8, padding=4)
    torch.manual_seed(7)
    assert torch.equal(a, A.random_crop(x, 8, padding=4))
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    assert torch.equal(A.random_crop(x, 8, 4, g(1)), A.random_crop(x, 8, 4, g(1)))
    assert not torch.equal(A.random_crop(x, 8, 4, g(1)), A.random_crop(x, 8, 4, g(2)))
    with pytest.raises(ValueError):
        A.random_crop(x, 9)


def test_random_flip_flips_about_half_exactly():
    torch.manual_seed(0)
    x = torch.rand(2000, 2, 3, 5)
    out = A.random_flip(x)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert bool((flipped ^ kept).all())  # each sample: exactly mirrored or untouched
    assert 0.45 < flipped.float().mean().item() < 0.55
    assert A.random_flip(x, p=0.0).equal(x) and A.random_flip(x, p=1.0).equal(x.flip(-1))


def test_random_resized_crop():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 16)
    assert A.random_resized_crop(x, (5, 7)).shape == (6, 3, 5, 7)
    same = A.random_resized_crop(x, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-5)
    # a box of exactly the output size: no resampling, an exact window at a random place
    out = A.random_resized_crop(x, 8, scale=(0.25, 0.25), ratio=(1.0, 1.0))
    hits = _window_offsets(out, x, 8, 8)
    assert all(len(h) == 1 for h in hits) and len({h[0] for h in hits}) > 2
    # bilinear resampling stays within the range of the input
    out = A.random_resized_crop(x, 24)
    assert out.min() >= x.min() - 1e-6 and out.max() <= x.max() + 1e-6
    # no box of ratio 1 fits a 10 x 20 image at full area: the central 10 x 10 square
    wide = torch.rand(2, 1, 10, 20)
    out = A.random_resized_crop(wide, 10, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(out, wide[..., 5:15], atol=1e-5)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(
        A.random_resized_crop(x, 8, generator=g()), A.random_resized_crop(x, 8, generator=g())
    )


def test_center_crop_and_normalize_by_hand():
    x = torch.arange(60.0).reshape(2, 1, 5, 6)
    assert torch.equal(A.center_crop(x, (3, 2)), x[..., 1:4, 2:4])
    x = torch.tensor([0.5, 0.2, 1.0]).reshape(1, 3, 1, 1)
    y = A.normalize(x, (0.5, 0.1, 0.2), (0.5, 0.1, 0.4))
    assert torch.allclose(y.flatten(), torch.tensor([0.0, 1.0, 2.0]))


# -- the batch_transform hook ---------------------------------------------------------------
def test_batch_transform_normalises_and_augments_only_training_batches(tmp_path):
    write_fake_cifar(tmp_path, 100, 10, 10)
    dm = _cifar(CIFAR100, tmp_path, tmp_path)
    g = torch.Generator().manual_seed(0)
    mean, std = torch.tensor(dm.mean), torch.tensor(dm.std)
    # each pixel mean - std or mean + std with equal odds: exactly that mean and std, no clipping
    sign = torch.randint(0, 2, (512, 3, 32, 32), generator=g) * 2 - 1
    pix = mean.view(1, 3, 1, 1) + std.view(1, 3, 1, 1) * sign
    x = (pix * 255).round().clamp(0, 255).to(torch.uint8)

    ev = dm.batch_transform(x, train=False)
    assert ev.dtype == torch.float32 and ev.shape == x.shape
    assert torch.equal(ev, dm.batch_transform(x, train=False))
    m, s = ev.mean(dim=(0, 2, 3)), ev.std(dim=(0, 2, 3))
    assert torch.allclose(m, torch.zeros(3), atol=0.02)
    assert torch.allclose(s, torch.ones(3), atol=0.02)
    # one pixel by hand
    assert ev[3, 2, 5, 7].item() == pytest.approx((x[3, 2, 5, 7].item() / 255 - 0.4408) / 0.2761)

    tr = dm.batch_transform(x, train=True)
    assert tr.shape == x.shape and not torch.equal(tr, ev)
    dm.augment = False
    assert torch.equal(dm.batch_transform(x, train=True), ev)

    # the Lightning hook: training only when the trainer is training
    batch = (x[:4], torch.zeros(4, dtype=torch.long), torch.arange(4))
    dm.augment = True
    dm.trainer = SimpleNamespace(training=False)
    out = dm.on_after_batch_transfer(batch, 0)
    assert len(out) == 3 and torch.equal(out[0], ev[:4]) and out[2] is batch[2]
    # data sets stored as model input keep their batches as they are
    digits = Digits(name="digits", data_dir=str(tmp_path), val_size=144)
    assert digits.on_after_batch_transfer(batch, 0) is batch


def test_lightning_applies_the_transform_on_the_device(tmp_path):
    import lightning as L

    write_fake_cifar(tmp_path, 10, 40, 24)
    dm = _cifar(CIFAR10, tmp_path, tmp_path, val_size=0, eval_batch_size=8)

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3 * 32 * 32, 10)
            self.seen = {}

        def training_step(self, batch, i):
            x, y, idx = batch
            self.seen["train"] = (x, idx)
            return F.cross_entropy(self.lin(x.flatten(1)), y)

        def validation_step(self, batch, i):
            self.seen["val"] = (batch[0], batch[2])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    probe = Probe()
    trainer = L.Trainer(
        fast_dev_run=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(probe, datamodule=dm)
    x, idx = probe.seen["val"]
    assert torch.equal(x, dm.batch_transform(dm.test_x[idx], train=False))
    x, idx = probe.seen["train"]
    assert x.dtype == torch.float32 and x.shape == (16, 3, 32, 32)
    eval_view = dm.batch_transform(dm.train_x[idx], train=False)
    differs = (x != eval_view).flatten(1).any(1)
    assert differs.float().mean() > 0.5  # augmented (crop or flip: identity for 1/162)


# -- image folders --------------------------------------------------------------------------
COLOURS = {"cat": (220, 20, 20), "dog": (20, 20, 220)}


def _png(path, size, colour, stripe=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.empty((size[1], size[0], 3), dtype=np.uint8)
    a[:] = colour
    if stripe is not None:  # the outer columns, cut off by the central crop
        a[:, :stripe] = (0, 255, 0)
        a[:, -stripe:] = (0, 255, 0)
    Image.fromarray(a).save(path)


def _folder(root):
    for split, n in (("train", 3), ("val", 2)):
        for cls, colour in COLOURS.items():
            for i in range(n):
                size = [(40, 20), (20, 30), (24, 24)][i]
                _png(root / split / cls / f"{i}.png", size, colour, stripe=10 if i == 0 else None)
    return root


def _imagefolder(root, tmp_path, **kw):
    args = dict(
        name="imagefolder",
        data_dir=str(tmp_path / "cache"),
        image_size=16,
        resize_size=20,
        val_size=0,
        batch_size=4,
        decode_threads=2,
    )
    return ImageFolder(root=str(root), **{**args, **kw})


def test_imagefolder_loads_labels_by_folder_and_caches(tmp_path, monkeypatch):
    root = _folder(tmp_path / "images")
    calls = []
    real = imagefolder.decode
    monkeypatch.setattr(imagefolder, "decode", lambda p, s: calls.append(p) or real(p, s))
    dm = _imagefolder(root, tmp_path)
    assert calls == [] and dm.classes == ["cat", "dog"] and dm.num_classes == 2
    assert dm.input_shape == (3, 16, 16) and dm.stored_shape == (3, 20, 20)
    dm.setup()
    assert len(calls) == 10
    assert dm.train_x.shape == (6, 3, 20, 20) and dm.train_x.dtype == torch.uint8
    assert dm.test_x.shape == (4, 3, 20, 20)
    assert dm.train_y.tolist() == [0, 0, 0, 1, 1, 1] and dm.test_y.tolist() == [0, 0, 1, 1]
    # every pixel has its class colour: the striped 40 x 20 image lost its stripes to the crop
    for xs, ys in ((dm.train_x, dm.train_y), (dm.test_x, dm.test_y)):
        for img, label in zip(xs, ys, strict=True):
            colour = torch.tensor(COLOURS[dm.classes[label]], dtype=torch.uint8)
            assert (img == colour.view(3, 1, 1)).all()
    assert dm.batch_transform(dm.train_x, train=False).shape == (6, 3, 16, 16)
    assert dm.batch_transform(dm.train_x, train=True).shape == (6, 3, 16, 16)
    caches = list((tmp_path / "cache").glob("*.npz"))
    assert len(caches) == 1

    # the second load reads the cache: decoding again would fail
    def fail(p, s):
        raise AssertionError("decoded again")

    monkeypatch.setattr(imagefolder, "decode", fail)
    dm2 = _imagefolder(root, tmp_path)
    dm2.setup()
    assert torch.equal(dm2.train_x, dm.train_x) and torch.equal(dm2.test_y, dm.test_y)
    assert dm2.cache_key() == dm.cache_key()

    # an added image changes the folder: decoded again, a new cache entry and a new key
    monkeypatch.setattr(imagefolder, "decode", real)
    _png(root / "train" / "dog" / "3.png", (30, 30), COLOURS["dog"])
    dm3 = _imagefolder(root, tmp_path)
    dm3.setup()
    assert len(dm3.train_x) == 7 and dm3.train_y.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    assert dm3.cache_key() != dm.cache_key()


def test_imagefolder_errors(tmp_path):
    root = _folder(tmp_path / "images")
    bad = root / "train" / "cat" / "broken.png"
    bad.write_bytes(b"this is not a png")
    dm = _imagefolder(root, tmp_path)  # construction reads no image
    with pytest.raises(KdbenchError) as exc:
        dm.setup()
    assert str(bad) in _one_line(exc)
    bad.unlink()

    (root / "val" / "bird").mkdir()
    _png(root / "val" / "bird" / "0.png", (20, 20), (0, 0, 0))
    with pytest.raises(KdbenchError) as exc:
        _imagefolder(root, tmp_path)
    assert "bird" in _one_line(exc)
    (root / "train" / "bird").mkdir()  # the same classes now, but train/bird is empty
    with pytest.raises(KdbenchError) as exc:
        _imagefolder(root, tmp_path).setup()
    assert str(root / "train" / "bird") in _one_line(exc)

    with pytest.raises(KdbenchError, match="does not exist"):
        _imagefolder(tmp_path / "nowhere", tmp_path)
    (tmp_path / "half" / "train" / "a").mkdir(parents=True)
    with pytest.raises(KdbenchError, match="no val/ subfolder"):
        _imagefolder(tmp_path / "half", tmp_path)
    with pytest.raises(ConfigError, match="resize_size"):
        _imagefolder(root, tmp_path, resize_size=8)
