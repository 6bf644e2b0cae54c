"""Every method on every published CIFAR-100 pair: the configs name the taps each method needs,
and the method's modules build against both networks (checked on a dummy batch, no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose
from test_variant_presets import VARIANT_PRESETS

from kdbench.data.cifar import write_fake_cifar
from kdbench.run import prepare

ROOT = Path(__file__).resolve().parents[1]
PAIRS = sorted(  # the CRD columns (variant presets: tests/test_variant_presets.py)
    p.stem
    for p in (ROOT / "conf" / "experiment").glob("cifar100_*.yaml")
    if p.stem not in VARIANT_PRESETS
)
# the token-level methods of language models (tests/test_losses_text.py, test_text_pipeline.py)
TEXT_METHODS = {"jsd", "skew_kl", "skew_reverse_kl", "tvd", "hidden_cos", "minilm"}
METHODS = sorted(
    p.stem for p in (ROOT / "conf" / "method").glob("*.yaml") if p.stem not in TEXT_METHODS
)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar-pairs")
    write_fake_cifar(root, num_classes=100, n_train=8, n_test=8)
    return root


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forward passes: threads only add synchronisation
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("pair", PAIRS)
def test_every_method_attaches_to_the_pair(pair, cifar_root):
    assert len(PAIRS) == 9 and len(METHODS) >= 15
    for method in METHODS:
        cfg = compose(
            f"experiment={pair}", f"method={method}", f"dataset.root={cifar_root}", tiny=False
        )
        ctx = prepare(cfg)  # raises on a missing tap or a shape the method cannot bridge
        assert ctx.method.name == method
        if ctx.method.term is not None and ctx.method.beta > 0:
            for tap in ctx.method.taps:  # the pair provides what the method reads
                assert ctx.student.taps.get(tap) and ctx.teacher.taps.get(tap), (pair, method, tap)
