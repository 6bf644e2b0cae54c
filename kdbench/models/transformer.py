"""Small transformers over token ids: a decoder-only language model and an encoder classifier.

Both take a LongTensor of token ids ``[B, T]`` (id 0 is padding in every kdbench vocabulary) and
are pre-LN transformers with learned position embeddings: ``x + attn(ln1(x))`` then
``x + mlp(ln2(x))`` (GELU, 4x width) per block, a final LayerNorm ``ln_f``.

- ``arch=gpt`` (:class:`GPT`): causal self-attention, logits ``[B, T, V]`` for next-token
  prediction, the output head tied to the token embedding (one ``V x d_model`` matrix serves
  both, no bias); ``generate_step`` runs it incrementally with a key/value cache.
- ``arch=text_encoder`` (:class:`TextEncoder`): bidirectional self-attention with padding keys
  masked, the final states mean-pooled over the non-padding tokens into ``embedding``
  ``[B, H]``, then a linear head to the class logits ``[B, C]``.

Attention is written out (``softmax(Q K^T / sqrt(d_head))`` with its mask) so that identity
modules can expose what distillation methods read (see :mod:`kdbench.taps`):

- ``hidden``: each block's output ``[B, T, H]`` (``blocks.<i>.out``);
- ``attention``: each block's attention probabilities ``[B, heads, T, T]``
  (``blocks.<i>.attn.probs``; rows are queries, columns keys);
- ``values``: each block's value vectors ``[B, heads, T, d_head]`` (``blocks.<i>.attn.values``);
- ``final``: the output of the final LayerNorm ``[B, T, H]`` (``ln_f``);
- ``embedding`` (encoder only): the pooled vector ``[B, H]`` (also its ``hint``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.models import register_model

# One layer's cache: keys and values of the positions seen so far, each [B, heads, S, d_head].
LayerCache = tuple[torch.Tensor, torch.Tensor]


class SelfAttention(nn.Module):
    """Multi-head self-attention; ``probs`` and ``values`` are identity taps."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise KdbenchError(
                f"d_model={d_model} is not divisible by n_heads={n_heads}: choose d_model a "
                "multiple of n_heads"
            )
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.scale = 1.0 / math.sqrt(self.d_head)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.probs = nn.Identity()  # tap: attention probabilities [B, heads, T, S]
        self.values = nn.Identity()  # tap: value vectors [B, heads, T, d_head]
        self.attn_drop = nn.Dropout(dropout)
        self.resid_drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, blocked: torch.Tensor | None, cache: LayerCache | None = None
    ) -> tuple[torch.Tensor, LayerCache]:
        """``blocked``: True where a query may not attend a key, broadcastable to
        ``[B, heads, T, S]`` (S = cached + new positions). Returns the output and the keys and
        values of all S positions (the next step's cache)."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        v = self.values(v)
        if cache is not None:
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        scores = (q @ k.transpose(-2, -1)) * self.scale
        if blocked is not None:
            # the dtype's minimum, not -inf: a row with every key blocked (an all-padding
            # sequence) becomes uniform instead of NaN; any other row gets exact zeros there
            scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
        probs = self.probs(scores.softmax(dim=-1))
        out = (self.attn_drop(probs) @ v).transpose(1, 2).reshape(b, t, d)
        return self.resid_drop(self.proj(out)), (k, v)


class Block(nn.Module):
    """Pre-LN transformer block; ``out`` is the identity tap on its output."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model),
            nn.Dropout(dropout),
        )
        self.out = nn.Identity()  # tap: the block's output [B, T, H]

    def forward(
        self, x: torch.Tensor, blocked: torch.Tensor | None, cache: LayerCache | None = None
    ) -> tuple[torch.Tensor, LayerCache]:
        a, kv = self.attn(self.ln1(x), blocked, cache)
        x = x + a
        x = x + self.mlp(self.ln2(x))
        return self.out(x), kv


class _Transformer(nn.Module):
    """Token and position embeddings, blocks and the final LayerNorm shared by both models."""

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.vocab_size, self.max_len = int(vocab_size), int(max_len)
        self.d_model, self.n_layers, self.n_heads = int(d_model), int(n_layers), int(n_heads)
        self.tok = nn.Embedding(self.vocab_size, d_model)
        self.pos = nn.Embedding(self.max_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)  # tap: the final hidden state [B, T, H]
        self.default_taps: dict[str, object] = {
            "hidden": [f"blocks.{i}.out" for i in range(n_layers)],
            "attention": [f"blocks.{i}.attn.probs" for i in range(n_layers)],
            "values": [f"blocks.{i}.attn.values" for i in range(n_layers)],
            "final": "ln_f",
        }

    def _init_weights(self) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases, the residual projections
        scaled down by sqrt(2 * n_layers)."""
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.n_layers))

    def _embed(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        t = ids.shape[1]
        if start + t > self.max_len:
            raise KdbenchError(
                f"{type(self).__name__} takes at most max_len={self.max_len} positions, got "
                f"{start + t}: build it with a larger max_len (kwargs.max_len=...)"
            )
        pos = torch.arange(start, start + t, device=ids.device)
        return self.drop(self.tok(ids) + self.pos(pos))


class GPT(_Transformer):
    """Decoder-only (causal) transformer language model: ``forward(ids [B, T]) -> logits
    [B, T, V]``, the logits at position t predicting token t + 1. The output head is tied to
    the token embedding (``head.weight is tok.weight``)."""

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(vocab_size, max_len, d_model, n_layers, n_heads, dropout)
        self.head = nn.Linear(d_model, self.vocab_size, bias=False)
        self._init_weights()
        self.head.weight = self.tok.weight  # tied
        # blocked[i, j]: query i may not attend key j > i (not saved in state dicts)
        causal = torch.ones(self.max_len, self.max_len, dtype=torch.bool).triu(1)
        self.register_buffer("blocked", causal, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self._embed(ids)
        blocked = self.blocked[:t, :t]
        for block in self.blocks:
            x, _ = block(x, blocked)
        return self.head(self.ln_f(x))

    def generate_step(
        self, ids: torch.Tensor, cache: list[LayerCache] | None = None
    ) -> tuple[torch.Tensor, list[LayerCache]]:
        """Incremental forward with a key/value cache, for generation.

        ``ids`` ``[B, t]``: the tokens following the ``S`` positions in ``cache`` (None or an
        empty list to start; their positions are S .. S + t - 1). Returns the logits of the new
        tokens ``[B, t, V]`` (equal to those of a full forward over all S + t tokens) and the
        cache extended to S + t positions: a list of one ``(keys, values)`` pair per block,
        each ``[B, heads, S + t, d_head]``. S + t may not exceed ``max_len``.
        """
        past = cache[0][0].shape[2] if cache else 0
        t = ids.shape[1]
        x = self._embed(ids, start=past)
        blocked = self.blocked[past : past + t, : past + t]
        new_cache: list[LayerCache] = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, blocked, cache[i] if cache else None)
            new_cache.append(kv)
        return self.head(self.ln_f(x)), new_cache


class TextEncoder(_Transformer):
    """Bidirectional transformer encoder sequence classifier: ``forward(ids [B, T]) -> logits
    [B, C]``. Padding (id 0) is masked as attention keys and left out of the mean pool, so
    appending padding does not change the logits."""

    def __init__(
        self,
        num_classes: int,
        vocab_size: int,
        max_len: int,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(vocab_size, max_len, d_model, n_layers, n_heads, dropout)
        self.embedding = nn.Identity()  # tap: the pooled vector [B, H]
        self.head = nn.Linear(d_model, num_classes)
        self._init_weights()
        # the pooled vector serves relation methods and, as the hint, FitNets; no feature
        # maps, so attention transfer (stages) is refused before training
        self.default_taps.update(embedding="embedding", hint="embedding", stages=[])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = ids != 0  # [B, T]
        x = self._embed(ids)
        blocked = ~keep[:, None, None, :]  # [B, 1, 1, T]: padding keys
        for block in self.blocks:
            x, _ = block(x, blocked)
        x = self.ln_f(x)
        w = keep.unsqueeze(-1).to(x.dtype)
        pooled = (x * w).sum(1) / w.sum(1).clamp(min=1.0)  # an all-padding row pools to 0
        return self.head(self.embedding(pooled))


def _max_len(arch: str, input_shape: tuple[int, ...], max_len: int | None) -> int:
    if len(input_shape) != 1:
        raise KdbenchError(
            f"{arch} takes token ids of shape (length,), got inputs of shape {tuple(input_shape)}:"
            " use it with a text data set"
        )
    return int(max_len) if max_len is not None else int(input_shape[0])


@register_model("gpt")
def gpt(
    num_classes: int,
    input_shape: tuple[int, ...],
    d_model: int = 128,
    n_layers: int = 4,
    n_heads: int = 4,
    dropout: float = 0.0,
    max_len: int | None = None,
) -> GPT:
    """A causal LM over ``num_classes`` tokens (the vocabulary size) and at most ``max_len``
    positions (default: the data's context length ``input_shape[0]``)."""
    return GPT(
        num_classes, _max_len("gpt", input_shape, max_len), d_model, n_layers, n_heads, dropout
    )


@register_model("text_encoder")
def text_encoder(
    num_classes: int,
    input_shape: tuple[int, ...],
    vocab_size: int = 256,
    d_model: int = 128,
    n_layers: int = 4,
    n_heads: int = 4,
    dropout: float = 0.0,
    max_len: int | None = None,
) -> TextEncoder:
    """A sequence classifier into ``num_classes`` classes over token ids below ``vocab_size``
    (default 256: any uint8-stored vocabulary) and at most ``max_len`` positions (default: the
    data's length ``input_shape[0]``)."""
    return TextEncoder(
        num_classes,
        vocab_size,
        _max_len("text_encoder", input_shape, max_len),
        d_model,
        n_layers,
        n_heads,
        dropout,
    )
