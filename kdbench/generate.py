"""Autoregressive generation from any language model over token ids.

:func:`generate` works with any ``nn.Module`` whose forward maps ids ``[B, T]`` to logits
``[B, T, V]`` (or to an object with a ``.logits`` of that shape, as Hugging Face models return),
a :class:`kdbench.taps.TappedModel` around one too. A model with a ``generate_step(ids, cache)
-> (logits, cache)`` method (the zoo's ``gpt``, :class:`kdbench.models.hf.HFCausalLM`) is run
incrementally with its key/value cache; any other model is run on the whole sequence at every
step, cropped to its last ``max_len`` tokens where it has a ``max_len`` attribute.
"""

from __future__ import annotations

import torch
from torch import nn

from kdbench.errors import KdbenchError

PAD_ID = 0  # the padding token of every kdbench vocabulary


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    if not isinstance(out, torch.Tensor) and hasattr(out, "logits"):
        out = out.logits
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != ids.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise KdbenchError(
            f"generate needs a model that maps token ids [B, T] = {tuple(ids.shape)} to logits "
            f"[B, T, V]; {type(model).__name__} returned {got}"
        )
    return out


def _pick(
    logits: torch.Tensor,
    temperature: float,
    greedy: bool,
    top_k: int | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The next token of each row from its logits ``[B, V]``."""
    if greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def generate(
    model: nn.Module,
    prompts: torch.Tensor,
    max_new: int,
    temperature: float = 1.0,
    greedy: bool = False,
    eos: int | None = None,
    generator: torch.Generator | None = None,
    top_k: int | None = None,
) -> torch.Tensor:
    """Continue each prompt by ``max_new`` tokens; returns the prompts and their continuations,
    a LongTensor ``[B, P + max_new]`` on the model's device.

    ``greedy``: the most likely token at each step (``temperature`` 0 means greedy too); else a
    sample from ``softmax(logits / temperature)``, restricted to the ``top_k`` most likely
    tokens when given, drawn with ``generator`` (seeded: reproducible samples). After a row
    emits ``eos`` it emits padding (id 0) for the rest. The model runs in eval mode without
    gradients and gets its training mode back afterwards.
    """
    from kdbench.taps import TappedModel

    net = model.model if isinstance(model, TappedModel) else model
    if max_new < 0:
        raise KdbenchError(f"generate: max_new={max_new} is negative: give 0 or more tokens")
    if temperature < 0:
        raise KdbenchError(f"generate: temperature={temperature} is negative: give a value > 0")
    if top_k is not None and top_k < 1:
        raise KdbenchError(f"generate: top_k={top_k} keeps no token: give 1 or more, or None")
    greedy = greedy or temperature == 0
    param = next(net.parameters(), None)
    device = param.device if param is not None else prompts.device
    out = prompts.to(device=device, dtype=torch.long)
    if out.dim() != 2:
        raise KdbenchError(f"generate: prompts must be [B, P] token ids, got {tuple(out.shape)}")
    if max_new == 0:
        return out
    b, p = out.shape
    max_len = getattr(net, "max_len", None)
    step = getattr(net, "generate_step", None)
    use_cache = callable(step) and (max_len is None or p <= max_len)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    pieces = [out]
    mode = net.training
    net.eval()
    try:
        with torch.no_grad():
            cache = None
            for i in range(max_new):
                if i == 0 and use_cache:
                    logits, cache = step(out, None)
                elif use_cache:
                    logits, cache = step(pieces[-1], cache)
                else:
                    seq = torch.cat(pieces, dim=1) if len(pieces) > 1 else out
                    pieces = [seq]
                    logits = _logits(net, seq if max_len is None else seq[:, -max_len:])
                if not isinstance(logits, torch.Tensor) and hasattr(logits, "logits"):
                    logits = logits.logits
                token = _pick(logits[:, -1], temperature, greedy, top_k, generator)
                if eos is not None:
                    token = token.masked_fill(done, PAD_ID)
                    done |= token == eos
                pieces.append(token.unsqueeze(1))
                if eos is not None and bool(done.all()):
                    pad = torch.full((b, max_new - i - 1), PAD_ID, dtype=torch.long, device=device)
                    pieces.append(pad)
                    break
                if use_cache and max_len is not None and p + i + 1 > max_len:
                    use_cache = False  # the cache is full: crop and recompute from now on
    finally:
        net.train(mode)
    return torch.cat(pieces, dim=1)
