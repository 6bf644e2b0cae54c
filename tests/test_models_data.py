"""Model zoo, feature taps, data modules, metrics and small building blocks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdbench.data.base import UNLABELLED, BatchTensorDataset
from kdbench.data.digits import Digits
from kdbench.data.mnist1d import MNIST1D
from kdbench.errors import ConfigError, KdbenchError
from kdbench.methods import make_regressor, masked_cross_entropy
from kdbench.metrics import agreement, expected_calibration_error
from kdbench.models import count_parameters, create_model, list_models
from kdbench.taps import TappedModel, resolve_taps


def test_registry_and_parameter_counts_computed_by_hand():
    assert {"cnn1d", "mlp"} <= set(list_models())
    mlp = create_model("mlp", num_classes=10, input_shape=(1, 40), hidden=[100, 100])
    assert count_parameters(mlp) == (40 * 100 + 100) + (100 * 100 + 100) + (100 * 10 + 10)
    teacher = create_model(
        "cnn1d", num_classes=10, input_shape=(1, 40), channels=[64, 64, 128, 128]
    )
    # conv weights (no bias) + BatchNorm (weight, bias) per block, then the linear head
    expected = (
        (1 * 64 * 5 + 2 * 64)
        + (64 * 64 * 3 + 2 * 64)
        + (64 * 128 * 3 + 2 * 128)
        + (128 * 128 * 3 + 2 * 128)
        + (128 * 10 + 10)
    )
    assert count_parameters(teacher) == expected == 88394
    small = create_model("cnn1d", num_classes=10, input_shape=(1, 40), channels=[12, 12, 24, 24])
    assert count_parameters(teacher) >= 5 * count_parameters(mlp)
    assert count_parameters(teacher) >= 5 * count_parameters(small)


def test_unknown_model_names_the_registered_ones():
    with pytest.raises(KdbenchError, match=r"unknown model arch='nope'.*'cnn1d'.*'mlp'"):
        create_model("nope", num_classes=10, input_shape=(1, 40))


def test_taps_return_stage_hint_and_embedding_outputs():
    model = create_model("cnn1d", num_classes=10, input_shape=(1, 40), channels=[8, 8, 16, 16])
    tapped = TappedModel(model, resolve_taps(model, {}, "teacher"))
    out = tapped(torch.randn(3, 1, 40), {"stages", "hint", "embedding"})
    assert [tuple(f.shape) for f in out["stages"]] == [(3, 8, 20), (3, 16, 10), (3, 16, 5)]
    assert out["hint"] is out["stages"][1]
    assert tuple(out["embedding"].shape) == (3, 16)
    assert torch.equal(out.logits, model.fc(out["embedding"]))
    assert tapped(torch.randn(2, 1, 40)).features == {}  # no taps asked, none recorded


def test_a_missing_tap_path_lists_the_module_names():
    model = create_model("mlp", num_classes=10, input_shape=(1, 40))
    with pytest.raises(
        KdbenchError, match=r"student.taps.hint='hidden.9'.*modules are: flatten, hidden, hidden.0"
    ):
        resolve_taps(model, {"hint": "hidden.9"}, "student")
    with pytest.raises(KdbenchError, match="is not a tap"):
        resolve_taps(model, {"hints": "hidden.0"}, "student")


@pytest.mark.parametrize(
    "s_shape,t_shape",
    [
        ((4, 8, 20), (4, 16, 20)),
        ((4, 8, 40), (4, 16, 20)),
        ((4, 8, 10), (4, 16, 20)),
        ((4, 8, 7), (4, 16, 5)),
        ((4, 100), (4, 16, 10)),
        ((4, 100), (4, 32)),
        ((4, 8, 6, 6), (4, 16, 3, 3)),
    ],
)
def test_regressor_maps_student_shape_to_teacher_shape(s_shape, t_shape):
    reg = make_regressor(torch.Size(s_shape), torch.Size(t_shape))
    out = reg(torch.randn(*s_shape))
    assert tuple(out.shape) == t_shape
    assert (out >= 0).all()  # BatchNorm then ReLU


def test_masked_cross_entropy_uses_only_labelled_samples():
    logits = torch.randn(6, 4, requires_grad=True)
    y = torch.tensor([1, UNLABELLED, 3, UNLABELLED, 0, 2])
    mask = y >= 0
    expected = F.cross_entropy(logits[mask], y[mask])
    assert torch.allclose(masked_cross_entropy(logits, y), expected)
    none = masked_cross_entropy(logits, torch.full((6,), UNLABELLED))
    assert none.item() == 0.0 and none.requires_grad
    none.backward()
    assert (logits.grad == 0).all()  # a batch without labels gives the CE term no gradient


def test_masked_cross_entropy_by_hand():
    # logits (0, ln 3) with label 1: p = 3/4, CE = ln 4/3; (ln 3, 0) with label 1: p = 1/4,
    # CE = ln 4; the unlabelled row is ignored: mean = (ln 4/3 + ln 4) / 2
    logits = torch.tensor([[0.0, math.log(3)], [math.log(3), 0.0], [5.0, -5.0]])
    y = torch.tensor([1, 1, UNLABELLED])
    expected = (math.log(4 / 3) + math.log(4)) / 2
    assert masked_cross_entropy(logits, y).item() == pytest.approx(expected, rel=1e-6)


def _served(dm, epoch):
    dm.trainer = None
    dm._epoch = lambda: epoch
    return [idx for _, _, idx in dm.train_dataloader()]


def test_training_batches_are_slices_of_the_epochs_permutation(tmp_path):
    dm = MNIST1D(
        name="mnist1d", data_dir=str(tmp_path), num_samples=600, val_size=100, transfer_size=50
    )
    dm.prepare_data()
    dm.setup()
    dm.use_transfer, dm.batch_size, dm.steps_per_call, dm.shuffle_seed = True, 64, 2, 7
    ds = dm.distill_set()
    first, again, second = _served(dm, 0), _served(dm, 0), _served(dm, 1)
    order = torch.cat(first)
    # every sample once per epoch, batches of 64 x 2 steps (the last one short)
    assert sorted(order.tolist()) == list(range(len(ds)))
    assert [len(b) for b in first] == [128] * (len(ds) // 128) + [len(ds) % 128]
    # a function of (seed, epoch): the same again, another one next epoch
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(order, torch.cat(second))
    x, y, idx = next(iter(dm.train_dataloader()))
    assert torch.equal(x, ds.x[idx]) and torch.equal(y, ds.y[idx])


def test_other_samplers_are_batched_as_batch_sampler_does():
    from torch.utils.data import SubsetRandomSampler

    from kdbench.data.base import SliceBatchSampler

    sampler = SubsetRandomSampler([5, 3, 8, 1, 9], generator=torch.Generator().manual_seed(0))
    batches = list(SliceBatchSampler(sampler, 2, drop_last=False))
    assert sorted(i for b in batches for i in b) == [1, 3, 5, 8, 9]
    assert [len(b) for b in batches] == [2, 2, 1]


@pytest.mark.parametrize(
    "shape,dtype,batch,steps",
    [
        ((1, 40), torch.float32, 128, 32),
        ((3, 32, 32), torch.uint8, 64, 32),
        ((3, 32, 32), torch.float32, 1024, 2),
        ((3, 224, 224), torch.uint8, 256, 1),
    ],
)
def test_auto_steps_per_call_fills_32_mb_with_at_most_32_steps(shape, dtype, batch, steps):
    class Stored(MNIST1D):
        storage_dtype = dtype
        stored_shape = shape

    dm = Stored.__new__(Stored)
    dm.batch_size = batch
    assert dm.resolve_steps("auto") == steps
    assert dm.resolve_steps(3) == 3
    with pytest.raises(ConfigError, match="steps_per_call"):
        dm.resolve_steps(0)


def test_batch_dataset_serves_slices_with_indices():
    ds = BatchTensorDataset(torch.arange(10.0).reshape(10, 1), torch.arange(10))
    x, y, idx = ds.__getitems__([7, 2, 5])
    assert (
        x.squeeze(1).tolist() == [7.0, 2.0, 5.0]
        and y.tolist() == [7, 2, 5]
        and idx.tolist() == [7, 2, 5]
    )


def test_ece_and_agreement_by_hand():
    # two samples, confidences 0.9 (correct) and 0.6 (wrong): bins (0.8,0.867], ... single each
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4]]))
    y = torch.tensor([0, 1])
    # ECE = 1/2 * |1 - 0.9| + 1/2 * |0 - 0.6| = 0.05 + 0.3
    assert expected_calibration_error(logits, y) == pytest.approx(0.35, abs=1e-6)
    assert agreement(logits, torch.tensor([[0.0, 1.0], [2.0, 0.0]])) == 0.5


def _mnist1d(tmp_path, **kw):
    args = dict(
        name="mnist1d",
        data_dir=str(tmp_path),
        num_samples=500,
        val_size=50,
        transfer_size=300,
        batch_size=32,
    )
    return MNIST1D(**{**args, **kw})


def test_mnist1d_splits_transfer_set_and_disk_cache(tmp_path, monkeypatch):
    dm = _mnist1d(tmp_path)
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_x) == 350 and len(dm.val_x) == 50 and len(dm.test_x) == 100
    assert tuple(dm.train_x.shape[1:]) == (1, 40) == dm.input_shape
    assert len(dm.transfer_x) == 300
    assert len(dm.distill_set()) == 350  # the transfer set only joins when distillation needs it
    dm.use_transfer = True
    ds = dm.distill_set()
    assert len(ds) == 650 and (ds.y[350:] == UNLABELLED).all() and (ds.y[:350] >= 0).all()
    # the transfer samples are new samples, not copies of the labelled ones
    assert not any(torch.equal(dm.transfer_x[0], x) for x in dm.train_x)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.endswith(".npz") for f in files)
    # a second data module reads the cache: generating again would fail here
    monkeypatch.setattr(MNIST1D, "_make", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    dm2 = _mnist1d(tmp_path)
    dm2.setup()
    assert torch.equal(dm2.train_x, dm.train_x) and torch.equal(dm2.transfer_x, dm.transfer_x)
    # different generation arguments are a different cache entry
    with pytest.raises(AssertionError):
        _mnist1d(tmp_path, seed=43).setup()


def test_mnist1d_default_split_is_the_standard_4000_1000(tmp_path):
    dm = MNIST1D(name="mnist1d", data_dir=str(tmp_path), transfer_size=0)
    a = dm.arrays()
    assert a["x"].shape == (4000, 40) and a["x_test"].shape == (1000, 40)
    assert set(np.unique(a["y"])) == set(range(10))


def test_digits(tmp_path):
    dm = Digits(name="digits", data_dir=str(tmp_path), val_size=144)
    dm.setup()
    assert len(dm.train_x) + len(dm.val_x) == 1437 and len(dm.test_x) == 360
    assert dm.input_shape == (1, 64) and float(dm.train_x.max()) <= 1.0
    with pytest.raises(ConfigError, match="cannot generate unlabelled samples"):
        Digits(name="digits", data_dir=str(tmp_path), transfer_size=10)


def test_efficiency_figures_by_hand():
    from omegaconf import OmegaConf

    from kdbench.efficiency import compare

    s = TappedModel(create_model("mlp", num_classes=10, input_shape=(1, 40)), {})
    t = TappedModel(create_model("cnn1d", num_classes=10, input_shape=(1, 40)), {})
    cfg = OmegaConf.create({"device": "cpu", "latency_runs": 5, "throughput_batch": 64})
    threads = torch.get_num_threads()
    r = compare(s, t, (1, 40), cfg)
    assert torch.get_num_threads() == threads  # latency is timed single-threaded, then restored
    # a linear layer costs 2 * in * out FLOPs per sample
    assert r["student/flops"] == 2 * (40 * 100 + 100 * 100 + 100 * 10)
    assert r["student/params"] == count_parameters(s.model) == 15210
    assert r["student/size_mb"] == pytest.approx(15210 * 4 / 2**20)
    assert r["compression"] == pytest.approx(88394 / 15210)
    assert r["speedup"] == pytest.approx(r["teacher/latency_ms"] / r["student/latency_ms"])
    assert r["student/throughput"] > 0 and r["teacher/flops"] > r["student/flops"]
