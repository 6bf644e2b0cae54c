"""The text models (arch=gpt, arch=text_encoder, a local Hugging Face causal LM) and generation:
parameter counts written out by hand, causality, padding invariance, the KV cache, taps."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.generate import generate
from kdbench.models import build_from_spec, count_parameters, create_model
from kdbench.taps import TappedModel, resolve_taps

CONF = Path(__file__).resolve().parents[1] / "conf"
TAPS = frozenset({"hidden", "attention", "values", "final"})


def _gpt(v=10, length=8, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"d_model": 16, "n_layers": 2, "n_heads": 2, **kw}
    return create_model("gpt", num_classes=v, input_shape=(length,), **kw).eval()


def _encoder(seed=0):
    torch.manual_seed(seed)
    return create_model(
        "text_encoder",
        num_classes=3,
        input_shape=(8,),
        vocab_size=10,
        d_model=16,
        n_layers=2,
        n_heads=2,
    ).eval()


def test_parameter_counts_by_hand():
    # d = 16, 2 blocks, vocab 10, 8 positions. One block: ln1 2*16 + qkv 16*48+48 + proj
    # 16*16+16 + ln2 2*16 + fc1 16*64+64 + fc2 64*16+16 = 32+816+272+32+1088+1040 = 3280.
    # gpt: tok 10*16 + pos 8*16 + 2 blocks + ln_f 32 + head 0 (tied) = 160+128+6560+32
    gpt = _gpt()
    assert count_parameters(gpt) == 6880
    assert gpt.head.weight is gpt.tok.weight
    # text_encoder: the same body + a linear head 16*3+3
    assert count_parameters(_encoder()) == 6880 + 51


def test_gpt_shapes_taps_and_causality():
    gpt = _gpt()
    ids = torch.randint(1, 10, (3, 6), generator=torch.Generator().manual_seed(1))
    model = TappedModel(gpt, resolve_taps(gpt, {}, "student"))
    out = model(ids, TAPS)
    assert out.logits.shape == (3, 6, 10)
    assert [tuple(h.shape) for h in out.features["hidden"]] == [(3, 6, 16)] * 2
    assert [tuple(v.shape) for v in out.features["values"]] == [(3, 2, 6, 8)] * 2
    assert out.features["final"].shape == (3, 6, 16)
    for probs in out.features["attention"]:
        assert probs.shape == (3, 2, 6, 6)
        torch.testing.assert_close(probs.sum(-1), torch.ones(3, 2, 6))
        assert probs.triu(1).abs().max() == 0  # no query attends a later key
    # changing token 3 changes no logits before position 3, and those from 3 on
    changed = ids.clone()
    changed[:, 3] = ids[:, 3] % 9 + 1
    a, b = gpt(ids), gpt(changed)
    torch.testing.assert_close(a[:, :3], b[:, :3], rtol=0, atol=1e-6)
    assert (a[:, 3:] - b[:, 3:]).abs().amax(dim=-1).min() > 1e-4


def test_gpt_kv_cache_equals_full_forward():
    gpt = _gpt(length=12)
    ids = torch.randint(1, 10, (2, 12), generator=torch.Generator().manual_seed(2))
    full = gpt(ids)
    logits, cache = gpt.generate_step(ids[:, :5])  # prefill 5, then 3 at once, then 1 by 1
    steps = [logits]
    logits, cache = gpt.generate_step(ids[:, 5:8], cache)
    steps.append(logits)
    for t in range(8, 12):
        logits, cache = gpt.generate_step(ids[:, t : t + 1], cache)
        steps.append(logits)
    assert len(cache) == 2 and cache[0][0].shape == (2, 2, 12, 8)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    with pytest.raises(KdbenchError, match="max_len=12"):
        gpt.generate_step(ids[:, :1], cache)  # position 12 does not exist
    with pytest.raises(KdbenchError, match="max_len=12"):
        gpt(torch.ones(1, 13, dtype=torch.long))
    assert _gpt(length=8, max_len=20)(torch.ones(1, 20, dtype=torch.long)).shape == (1, 20, 10)
    with pytest.raises(KdbenchError, match="shape \\(length,\\)"):
        create_model("gpt", num_classes=10, input_shape=(1, 8))


def test_encoder_padding_invariance_and_taps():
    enc = _encoder()
    ids = torch.tensor([[3, 4, 5, 0, 0, 0], [7, 1, 2, 9, 4, 0]])
    padded = torch.cat([ids, torch.zeros(2, 2, dtype=torch.long)], dim=1)
    torch.testing.assert_close(enc(ids), enc(padded), rtol=0, atol=1e-6)
    moved = ids.clone()
    moved[0, 1] = 8
    assert (enc(moved)[0] - enc(ids)[0]).abs().max() > 1e-4  # a real token does matter
    model = TappedModel(enc, resolve_taps(enc, {}, "student"))
    out = model(padded, TAPS | {"embedding", "hint"})
    assert out.logits.shape == (2, 3)
    assert out.features["embedding"].shape == (2, 16)
    assert out.features["hint"] is out.features["embedding"]
    assert [tuple(h.shape) for h in out.features["hidden"]] == [(2, 8, 16)] * 2
    probs = out.features["attention"][0]
    assert probs.shape == (2, 2, 8, 8)
    assert probs[0, :, :, 3:].abs().max() == 0 and probs[1, :, :, 5:].abs().max() == 0
    assert probs[0, :, :, :3].min() > 0  # bidirectional: every query sees every real token
    assert torch.isfinite(enc(torch.zeros(1, 8, dtype=torch.long))).all()  # all padding


class _Full(nn.Module):
    """A model without generate_step or max_len: generate runs full forwards."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        return self.inner(ids)


def _greedy_by_hand(model, prompts, max_new, window):
    seq = prompts
    for _ in range(max_new):
        nxt = model(seq[:, -window:])[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


def test_generate_greedy_equals_argmax_by_hand():
    gpt = _gpt(length=8, d_model=32)
    prompts = torch.tensor([[1, 2, 3], [4, 4, 9]])
    for max_new in (4, 9):  # 9: past max_len=8, the window slides (cache, then recompute)
        expected = _greedy_by_hand(gpt, prompts, max_new, window=8)
        assert expected.shape == (2, 3 + max_new)
        assert torch.equal(generate(gpt, prompts, max_new, greedy=True), expected)
        tapped = TappedModel(gpt, resolve_taps(gpt, {}, "student"))
        assert torch.equal(generate(tapped, prompts, max_new, temperature=0), expected)
    # no cache: full forwards on the whole sequence (no max_len to crop to)
    long_gpt = _gpt(length=16, d_model=32)
    expected = _greedy_by_hand(long_gpt, prompts, 6, window=16)
    assert torch.equal(generate(_Full(long_gpt), prompts, 6, greedy=True), expected)
    gpt.train()
    generate(gpt, prompts, 2)
    assert gpt.training  # the mode is restored


def test_generate_sampling_is_reproducible():
    gpt = _gpt(length=16)
    prompts = torch.tensor([[1, 2], [3, 4]])

    def sample(seed, **kw):
        return generate(gpt, prompts, 10, generator=torch.Generator().manual_seed(seed), **kw)

    a = sample(0)
    assert a.shape == (2, 12) and a.dtype == torch.long and torch.equal(a[:, :2], prompts)
    assert torch.equal(a, sample(0))
    assert not torch.equal(a, sample(1))
    assert torch.equal(sample(3, top_k=1), generate(gpt, prompts, 10, greedy=True))


class _Counter(nn.Module):
    """Predicts token (previous + 1) % 10 and returns an object with .logits, as HF does."""

    def forward(self, ids):
        return types.SimpleNamespace(logits=nn.functional.one_hot((ids + 1) % 10, 10) * 5.0)


def test_generate_eos_then_padding():
    prompts = torch.tensor([[1], [3], [6]])
    out = generate(_Counter(), prompts, 5, greedy=True, eos=4)
    assert out.tolist() == [[1, 2, 3, 4, 0, 0], [3, 4, 0, 0, 0, 0], [6, 7, 8, 9, 0, 1]]
    out = generate(_Counter(), prompts[:2], 5, greedy=True, eos=4)  # all done: padded out
    assert out.tolist() == [[1, 2, 3, 4, 0, 0], [3, 4, 0, 0, 0, 0]]


def test_hf_causal_lm_needs_transformers(monkeypatch):
    from kdbench.models.hf import HFCausalLM

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    with pytest.raises(KdbenchError, match=r'pip install -c constraints.txt "kdbench\[hf\]"'):
        HFCausalLM("/nowhere", num_classes=10)


def test_hf_causal_lm_from_a_local_directory(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the [hf] extra is not installed")
    from kdbench.models.hf import HFCausalLM

    v = 10
    config = transformers.GPT2Config(
        vocab_size=v + 3, n_positions=64, n_embd=32, n_layer=2, n_head=2
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    spec = {"_target_": "kdbench.models.hf.HFCausalLM", "kwargs": {"path": str(tmp_path)}}
    model = build_from_spec(spec, v, (16,), "student", check_output=False).eval()
    assert isinstance(model, HFCausalLM) and model.max_len == 64
    ids = torch.randint(1, v, (2, 7), generator=torch.Generator().manual_seed(3))
    logits = model(ids)
    assert logits.shape == (2, 7, v)  # the 3 extra vocabulary columns are sliced off
    torch.testing.assert_close(logits, model.hf(ids).logits[..., :v])
    tapped = TappedModel(model, resolve_taps(model, {}, "student"))
    out = tapped(ids, frozenset({"hidden", "final"}))
    assert [tuple(h.shape) for h in out.features["hidden"]] == [(2, 7, 32)] * 2
    assert out.features["final"].shape == (2, 7, 32)
    torch.testing.assert_close(out.logits, logits)
    # generation through its KV cache equals greedy argmax over full forwards
    expected = _greedy_by_hand(model, ids[:, :3], 5, window=64)
    assert torch.equal(generate(tapped, ids[:, :3], 5, greedy=True), expected)
    with pytest.raises(KdbenchError, match="13 tokens, fewer than the data's 20"):
        HFCausalLM(str(tmp_path), num_classes=20)
    with pytest.raises(KdbenchError, match="not a directory"):
        HFCausalLM(str(tmp_path / "missing"), num_classes=v)
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / "student" / "hf_causal_lm.yaml")
    assert cfg._target_ == "kdbench.models.hf.HFCausalLM"
    assert OmegaConf.is_missing(cfg.kwargs, "path")


def test_zoo_configs_sizes():
    from omegaconf import OmegaConf

    def build(role, name, num_classes, length):
        cfg = OmegaConf.load(CONF / role / f"{name}.yaml")
        kw = OmegaConf.to_container(cfg.kwargs)
        return create_model(cfg.arch, num_classes=num_classes, input_shape=(length,), **kw)

    # shakespeare_char: 81 tokens, context 64; shakespeare_genre: 6 genres, context 128
    assert count_parameters(build("teacher", "gpt_small", 81, 64)) == 811904
    assert count_parameters(build("student", "gpt_tiny", 81, 64)) == 63600
    assert count_parameters(build("teacher", "encoder_small", 6, 128)) == 373158
    assert count_parameters(build("student", "encoder_tiny", 6, 128)) == 37958
