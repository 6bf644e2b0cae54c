"""A Hugging Face causal language model from a local directory, as a kdbench teacher or student.

Reached through the bring-your-own-model route (``_target_``), not the registry::

    python -m kdbench ... student=hf_causal_lm student.kwargs.path=/models/my-tiny-lm

The directory is one written by ``save_pretrained`` (config and weights); it is loaded with
``local_files_only=True``, so nothing is downloaded at run time. It needs the optional extra
(``pip install -c constraints.txt "kdbench[hf]"``); transformers is imported only when such a
model is built.

The model reads kdbench's token ids (``dm.vocab``: id = position in the data's vocabulary), not
the ids of the model's own tokenizer: use an architecture trained (or to be trained) on
kdbench's vocabulary.
"""

from __future__ import annotations

import inspect
import os

import torch
from torch import nn

from kdbench.errors import KdbenchError

INSTALL_HINT = 'pip install -c constraints.txt "kdbench[hf]"'


def _transformers():
    try:
        import transformers
    except ImportError:
        raise KdbenchError(f"the Hugging Face route needs transformers: {INSTALL_HINT}") from None
    return transformers


def _vocab_size(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


class HFCausalLM(nn.Module):
    """``forward(ids [B, T]) -> logits [B, T, num_classes]`` of a local Hugging Face causal LM.

    ``path``: the directory ``save_pretrained`` wrote; other keyword arguments go to
    ``AutoModelForCausalLM.from_pretrained`` (e.g. ``torch_dtype``). The model's vocabulary
    must hold at least ``num_classes`` tokens (kdbench's vocabulary size); the logits of any
    tokens beyond it are sliced off, so the distributions are over kdbench's vocabulary alone.

    Taps: ``final`` (the last hidden state as the model reports it, after its final norm
    ``[B, T, H]``) and ``hidden`` (one ``[B, T, H]`` state per layer; the last one is that same
    final state, as Hugging Face's ``hidden_states`` give it). The hidden states are requested
    from the model only while a tap is hooked. ``generate_step`` runs it with its key/value
    cache (see :func:`kdbench.generate.generate`).
    """

    def __init__(self, path: str, num_classes: int, **kwargs) -> None:
        super().__init__()
        transformers = _transformers()
        path = os.path.expanduser(str(path))
        if not os.path.isdir(path):
            raise KdbenchError(
                f"HFCausalLM: path={path!r} is not a directory: give the directory a model's "
                "save_pretrained wrote with kwargs.path=/that/dir"
            )
        try:
            self.hf = transformers.AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, **kwargs
            )
        except Exception as exc:  # noqa: BLE001 - not a model directory, unknown architecture
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise KdbenchError(
                f"HFCausalLM: loading a causal LM from {path} failed: {type(exc).__name__}: {first}"
            ) from None
        vocab = _vocab_size(self.hf)
        if vocab < num_classes:
            raise KdbenchError(
                f"HFCausalLM: the model at {path} has a vocabulary of {vocab} tokens, fewer than "
                f"the data's {num_classes}: use a model with at least {num_classes}"
            )
        self.num_classes = int(num_classes)
        self._cache_arg: str | None = None
        config = self.hf.config
        n_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
        max_len = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        if max_len is not None:
            self.max_len = int(max_len)
        self.final = nn.Identity()  # tap: the last hidden state [B, T, H]
        self.hidden = nn.ModuleList(nn.Identity() for _ in range(n_layers))  # tap: per layer
        self.default_taps = {
            "hidden": [f"hidden.{i}" for i in range(n_layers)],
            "final": "final",
        }

    def _tapped(self) -> bool:
        return bool(self.final._forward_hooks) or any(m._forward_hooks for m in self.hidden)

    def _out(self, out) -> torch.Tensor:
        if out.hidden_states is not None:
            states = out.hidden_states[1:]  # [0] is the embedding output
            for tap, state in zip(self.hidden, states, strict=False):
                tap(state)
            self.final(out.hidden_states[-1])
        return out.logits[..., : self.num_classes]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.hf(input_ids=ids, output_hidden_states=self._tapped(), use_cache=False)
        return self._out(out)

    def generate_step(self, ids: torch.Tensor, cache=None):
        """Logits ``[B, t, num_classes]`` of ``ids`` ``[B, t]`` following the positions in
        ``cache`` (None to start) and the extended cache (the model's ``past_key_values``)."""
        if self._cache_arg is None:  # transformers 5 renamed past_key_values to cache
            params = inspect.signature(self.hf.forward).parameters
            self._cache_arg = "cache" if "cache" in params else "past_key_values"
        out = self.hf(
            input_ids=ids,
            use_cache=True,
            output_hidden_states=self._tapped(),
            **{self._cache_arg: cache},
        )
        new = out["cache"] if "cache" in out else out["past_key_values"]
        return self._out(out), new
