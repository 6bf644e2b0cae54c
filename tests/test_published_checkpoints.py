"""Published teacher checkpoints (RepDistiller / mdistiller) load as they are: their file layout
``{'model': state_dict, 'epoch', 'accuracy', 'optimizer'}`` and their module names, mapped per
architecture, checked shape by shape (kdbench/checkpoints.py, kdbench/teacher.py)."""

from __future__ import annotations

import argparse
import re

import pytest
import torch
from conftest import compose, mlflow_runs, run_cli

from kdbench.errors import KdbenchError, checked_instantiate
from kdbench.models import count_parameters, create_model
from kdbench.teacher import load_checkpoint

# Key names and shapes copied from the reference code (RepDistiller models/*.py at 100 classes;
# mdistiller's models/cifar have the same): if kdbench's mapping were wrong, the files built
# below would lack them.
REFERENCE_LITERALS = {
    "resnet56": {
        "layer3.8.bn2.running_var": (64,),
        "layer2.0.downsample.0.weight": (32, 16, 1, 1),
        "fc.weight": (100, 64),
    },
    "resnet110": {"layer3.17.conv2.weight": (64, 64, 3, 3), "layer3.0.downsample.1.weight": (64,)},
    "resnet20": {"layer2.2.conv1.weight": (32, 32, 3, 3), "fc.weight": (100, 64)},
    "resnet32": {"layer3.4.bn1.num_batches_tracked": (), "fc.weight": (100, 64)},
    "resnet8x4": {"layer1.0.downsample.0.weight": (64, 32, 1, 1), "fc.weight": (100, 256)},
    "resnet32x4": {"conv1.weight": (32, 3, 3, 3), "layer3.4.conv2.weight": (256, 256, 3, 3)},
    "resnet50": {
        "layer1.0.shortcut.0.weight": (256, 64, 1, 1),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "linear.weight": (100, 2048),
    },
    "wrn_40_2": {
        "block1.layer.0.bn1.weight": (16,),
        "block2.layer.0.convShortcut.weight": (64, 32, 1, 1),
        "block3.layer.5.conv2.weight": (128, 128, 3, 3),
        "bn1.running_mean": (128,),
        "fc.weight": (100, 128),
    },
    "wrn_16_2": {
        "block1.layer.0.convShortcut.weight": (32, 16, 1, 1),
        "block3.layer.1.bn2.weight": (128,),
    },
    "wrn_40_1": {
        "block1.layer.0.bn1.weight": (16,),
        "block3.layer.0.convShortcut.weight": (64, 32, 1, 1),
    },
    "vgg13": {
        "block0.3.weight": (64, 64, 3, 3),
        "block4.4.running_var": (512,),
        "classifier.weight": (100, 512),
    },
    "vgg8": {"block0.0.bias": (64,), "block4.1.weight": (512,), "classifier.weight": (100, 512)},
    "mobilenetv2": {
        "conv1.0.weight": (16, 3, 3, 3),
        "blocks.6.0.conv.7.running_mean": (160,),
        "conv2.0.weight": (1280, 160, 1, 1),
        "classifier.0.weight": (100, 1280),
    },
    "shufflev1": {
        "layer1.0.conv1.weight": (54, 24, 1, 1),
        "layer3.3.bn3.weight": (960,),
        "linear.weight": (100, 960),
    },
    "shufflev2": {
        "conv1.weight": (24, 3, 1, 1),
        "layer1.0.conv5.weight": (58, 58, 1, 1),
        "layer3.3.bn3.running_var": (232,),
        "conv2.weight": (1024, 464, 1, 1),
        "linear.weight": (100, 1024),
    },
}
# number of entries of each reference network's state dict at 100 classes (RepDistiller)
REFERENCE_KEY_COUNT = {
    "resnet8": 56,
    "resnet20": 128,
    "resnet32": 200,
    "resnet56": 344,
    "resnet110": 668,
    "resnet8x4": 62,
    "resnet32x4": 206,
    "resnet50": 320,
    "wrn_16_2": 83,
    "wrn_40_1": 226,
    "wrn_40_2": 227,
    "vgg8": 37,
    "vgg13": 72,
    "mobilenetv2": 320,
    "shufflev1": 296,
    "shufflev2": 338,
}
CIFAR = {"num_classes": 100, "input_shape": (3, 32, 32)}


def to_reference(key: str, arch: str) -> str:
    """kdbench's key -> the reference code's (written here from the reference model files,
    independently of kdbench/checkpoints.py, which maps the other way)."""
    if arch.startswith("wrn_"):
        key = re.sub(r"^(block\d)\.(\d+)\.", r"\1.layer.\2.", key)
        return key.replace(".shortcut.", ".convShortcut.")
    if arch == "resnet50":
        return re.sub(r"^fc\.", "linear.", key.replace(".downsample.", ".shortcut."))
    if arch == "mobilenetv2":
        return re.sub(r"^classifier\.", "classifier.0.", key)
    if arch.startswith("shufflev"):
        return re.sub(r"^fc\.", "linear.", key)
    return key


def random_model(arch: str, seed: int) -> torch.nn.Module:
    """``arch`` with random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = create_model(arch, **CIFAR)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif name.endswith("num_batches_tracked"):
                t.fill_(seed + 1000)
            elif t.is_floating_point():
                t.normal_()
    return model


def reference_file(path, model: torch.nn.Module, arch: str, **extra):
    """Save ``model`` the way RepDistiller's train_teacher.py does (``ckpt_epoch_240.pth``)."""
    sd = {to_reference(k, arch): v for k, v in model.state_dict().items()}
    optimizer = {  # torch.optim.SGD.state_dict(): nested dicts, lists, numbers, tensors
        "state": {0: {"momentum_buffer": torch.zeros(3)}},
        "param_groups": [
            {
                "lr": 0.0005,
                "momentum": 0.9,
                "dampening": 0,
                "weight_decay": 5e-4,
                "nesterov": False,
                "params": [0, 1, 2],
            }
        ],
    }
    obj = {"epoch": 240, "model": sd, "accuracy": torch.tensor(72.3), "optimizer": optimizer}
    torch.save({**obj, **extra}, path)
    return sd


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", sorted(REFERENCE_KEY_COUNT))
def test_reference_checkpoint_loads_into_the_zoo_model(arch, tmp_path):
    source = random_model(arch, seed=1)
    path = tmp_path / "ckpt_epoch_240.pth"
    sd = reference_file(path, source, arch)
    assert len(sd) == REFERENCE_KEY_COUNT[arch]
    for key, shape in REFERENCE_LITERALS.get(arch, {}).items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    target = create_model(arch, **CIFAR)  # another initialisation
    meta = load_checkpoint(path, target, arch)
    assert meta == {"format": "reference", "epoch": 240, "accuracy": 72.3}
    got, want = target.state_dict(), source.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_shufflev2_is_the_reference_network():
    model = create_model("shufflev2", **CIFAR)
    assert count_parameters(model) == 1_355_528  # RepDistiller's ShuffleV2(num_classes=100)
    assert model.conv1.kernel_size == (1, 1)


def test_plain_and_kdbench_layouts_still_load(tmp_path):
    source = random_model("wrn_16_2", seed=2)
    plain = tmp_path / "plain.pt"
    torch.save(source.state_dict(), plain)
    own = tmp_path / "own.pt"
    torch.save({"state_dict": source.state_dict(), "meta": {"test_acc": 0.5}}, own)
    # a plain state dict with the reference names, saved inside nn.DataParallel
    wrapped = tmp_path / "wrapped.pt"
    sd = {"module." + to_reference(k, "wrn_16_2"): v for k, v in source.state_dict().items()}
    torch.save(sd, wrapped)
    for path, meta in ((plain, {}), (own, {"test_acc": 0.5}), (wrapped, {})):
        target = create_model("wrn_16_2", **CIFAR)
        assert load_checkpoint(path, target, "wrn_16_2") == meta
        assert torch.equal(target.block2[0].shortcut.weight, source.block2[0].shortcut.weight)


def test_repdistiller_last_checkpoint_with_its_options_loads(tmp_path):
    # *_last.pth holds {'opt': argparse.Namespace, 'model', 'optimizer'}, no epoch or accuracy
    source = random_model("resnet8", seed=3)
    path = tmp_path / "resnet8_last.pth"
    opt = argparse.Namespace(model="resnet8", learning_rate=0.05, lr_decay_epochs=[150, 180])
    torch.save({"opt": opt, "model": source.state_dict(), "optimizer": {}}, path)
    target = create_model("resnet8", **CIFAR)
    assert load_checkpoint(path, target, "resnet8") == {"format": "reference"}
    assert torch.equal(target.fc.weight, source.fc.weight)


def test_a_mismatching_file_names_the_first_key_in_one_line(tmp_path):
    # a resnet8x4 teacher given as resnet8: the stem already differs
    path = tmp_path / "r8x4.pth"
    reference_file(path, random_model("resnet8x4", seed=4), "resnet8x4")
    with pytest.raises(KdbenchError) as info:
        load_checkpoint(path, create_model("resnet8", **CIFAR), "resnet8")
    msg = str(info.value)
    assert "\n" not in msg
    assert "key conv1.weight has shape (32, 3, 3, 3) in the file and (16, 3, 3, 3)" in msg
    # a wrn_40_2 teacher as wrn_16_2: every key of the smaller network fits, the first extra
    # one is named with the file's own name
    path = tmp_path / "wrn40_2.pth"
    reference_file(path, random_model("wrn_40_2", seed=5), "wrn_40_2")
    with pytest.raises(KdbenchError, match=r"key block1\.layer\.2\.bn1\.weight \(here block1"):
        load_checkpoint(path, create_model("wrn_16_2", **CIFAR), "wrn_16_2")
    # a file that lacks a key
    sd = random_model("vgg8", seed=6).state_dict()
    del sd["classifier.bias"]
    torch.save({"model": sd}, path)
    with pytest.raises(KdbenchError, match="key classifier.bias is missing from the file"):
        load_checkpoint(path, create_model("vgg8", **CIFAR), "vgg8")
    torch.save({"model": "resnet56", "epoch": 240}, path)
    with pytest.raises(KdbenchError, match="holds no state dict"):
        load_checkpoint(path, create_model("vgg8", **CIFAR), "vgg8")


def test_cli_runs_with_a_reference_layout_teacher(tmp_path):
    """As a user would: point teacher.checkpoint at a {'model': ...} file (MNIST-1D default
    pair); the run's teacher is exactly those weights; a file of other shapes is refused in one
    line naming the key."""
    cfg = compose()
    dm = checked_instantiate(cfg.dataset, _convert_="all")
    dm.prepare_data()
    dm.setup()
    kwargs = dict(num_classes=dm.num_classes, input_shape=dm.input_shape)
    torch.manual_seed(7)
    teacher = create_model("cnn1d", channels=list(cfg.teacher.kwargs.channels), **kwargs)
    optimizer = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = dm.batch_transform(dm.test_x, False)
    teacher(x[:8]).sum().backward()
    optimizer.step()  # a real optimizer state in the file, and weights no run would train
    teacher.eval()
    with torch.no_grad():
        expected = (teacher(x).argmax(1) == dm.test_y).float().mean().item()
    good = tmp_path / "ckpt_epoch_240.pth"
    state = {
        "epoch": 240,
        "model": teacher.state_dict(),
        "accuracy": torch.tensor(41.5),
        "optimizer": optimizer.state_dict(),
    }
    torch.save(state, good)
    wrong = tmp_path / "wrong.pth"
    other = create_model("cnn1d", channels=[8, 8, 16, 32], **kwargs)
    torch.save({**state, "model": other.state_dict()}, wrong)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(
        f"teacher.checkpoint={good}",
        "trainer.max_epochs=1",
        "efficiency.enabled=false",
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, runs = mlflow_runs("kdbench", uri=uri)
    (run,) = runs
    assert run.data.tags["teacher_source"] == "checkpoint"
    assert run.data.metrics["teacher/test/acc"] == pytest.approx(expected, abs=1e-6)

    proc = run_cli(f"teacher.checkpoint={wrong}", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdbench: error:")]
    assert len(errors) == 1
    assert "key stages.2.0.weight has shape (32, 16, 3) in the file and (16, 16, 3)" in errors[0]
