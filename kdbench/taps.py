"""Feature taps: intermediate outputs taken with forward hooks addressed by module path.

Any ``nn.Module`` can be a teacher or student without changing its forward: the config names the
module paths (``stages.1``, ``hidden.0``, ``layer3.1.relu``) and :class:`TappedModel` records what
those modules return. Three taps exist, each a module path or a list of them:

- ``stages``: the stage outputs (feature maps), for attention transfer;
- ``hint``: one intermediate output, for FitNets;
- ``embedding``: the pooled penultimate vector, for relation methods.

Transformers (text) add, per token: ``hidden`` (each block's output ``[B, L, H]``),
``attention`` (each block's attention probabilities ``[B, heads, L, L]``), ``values`` (each
block's value vectors ``[B, heads, L, d_head]``) and ``final`` (the last hidden state after the
final layer norm ``[B, L, H]``), for hidden_cos (DistilBERT) and minilm (MiniLM).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from kdbench.errors import KdbenchError

TAP_NAMES = ("stages", "hint", "embedding", "hidden", "attention", "values", "final")


@dataclass
class Outputs:
    """What one forward pass of a tapped model returns."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor | list[torch.Tensor]] = field(default_factory=dict)

    def map(self, fn) -> Outputs:
        """The same outputs with ``fn`` applied to every tensor (detach, index, move...)."""
        return Outputs(
            fn(self.logits),
            {
                k: [fn(t) for t in v] if isinstance(v, list) else fn(v)
                for k, v in self.features.items()
            },
        )

    def __getitem__(self, tap: str):
        return self.logits if tap == "logits" else self.features[tap]


def resolve_taps(model: nn.Module, overrides: Mapping | None, role: str) -> dict[str, object]:
    """The model's default taps with config overrides applied, every path checked to exist."""
    taps = dict(getattr(model, "default_taps", {}) or {})
    for key, value in (overrides or {}).items():
        if value is None:  # keep the architecture's default
            continue
        if key not in TAP_NAMES:
            raise KdbenchError(
                f"{role}.taps.{key} is not a tap: allowed taps are {list(TAP_NAMES)}"
            )
        taps[key] = list(value) if isinstance(value, list | tuple) else value
    names = dict(model.named_modules())
    for key, value in taps.items():
        for path in value if isinstance(value, list) else [value]:
            if path is not None and path not in names:
                listing = ", ".join(n for n in names if n)
                raise KdbenchError(
                    f"{role}.taps.{key}={path!r} is not a module of {type(model).__name__}; "
                    f"its modules are: {listing}"
                )
    return taps


class TappedModel(nn.Module):
    """Wraps a model; ``forward(x, taps)`` returns :class:`Outputs` with the requested taps."""

    def __init__(self, model: nn.Module, taps: dict[str, object]) -> None:
        super().__init__()
        self.model = model
        self.taps = taps
        self._store: dict[str, torch.Tensor] | None = None
        self._hooked: set[str] = set()  # hooks are added on a tap's first request: a module
        # with a forward hook is slower to call, so models asked for logits alone have none

    def _hook(self, path: str):
        def hook(_module, _inputs, output):
            if self._store is not None:
                self._store[path] = output

        return hook

    def _ensure_hooks(self, taps) -> None:
        for tap in taps:
            spec = self.taps.get(tap)
            for path in spec if isinstance(spec, list) else [spec]:
                if path and path not in self._hooked:
                    self.model.get_submodule(path).register_forward_hook(self._hook(path))
                    self._hooked.add(path)

    def forward(self, x: torch.Tensor, taps: frozenset[str] | set[str] = frozenset()) -> Outputs:
        if not taps:
            return Outputs(self.model(x))
        self._ensure_hooks(taps)
        self._store = {}
        try:
            logits = self.model(x)
            store = self._store
        finally:
            self._store = None
        features: dict[str, object] = {}
        for tap in taps:  # a tap the model lacks is left out; methods check for it when built
            spec = self.taps.get(tap)
            if spec:
                features[tap] = [store[p] for p in spec] if isinstance(spec, list) else store[spec]
        return Outputs(logits, features)
