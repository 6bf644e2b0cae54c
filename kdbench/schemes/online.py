"""Online distillation, deep mutual learning (Zhang et al. 2018): peers train from scratch at the
same time and teach each other.

The teacher and student configs become peers (``scheme.peers`` > 2 adds copies of the student).
Each peer's loss is ``gamma * CE + mean over the other peers j of (alpha * KD + beta * term)``
towards peer j's detached outputs; every ordered pair has its own method copy, so a FitNet
regressor exists per direction. Each peer has its own optimizer and schedule; one backward runs
over the summed loss (each peer's gradient only involves its own loss), which suits DDP.
"""

from __future__ import annotations

import torch
from torch import nn

from kdbench.methods import Method
from kdbench.metrics import ensemble_logits
from kdbench.schemes.base import SchemeModule
from kdbench.taps import TappedModel


def _key(i: str, j: str) -> str:
    return f"{i}__from__{j}"


class Online(SchemeModule):
    needs_pretrained_teacher = False
    accepts_teacher_ensemble = False
    named_outputs = True

    def __init__(
        self, peers: dict[str, TappedModel], methods: dict[str, Method], optim_cfg
    ) -> None:
        super().__init__(optim_cfg)
        self.peers = nn.ModuleDict(peers)
        self.methods = nn.ModuleDict(methods)
        self.taps = frozenset().union(*(m.taps for m in methods.values()))
        self.reference_method = next(iter(methods.values()))  # gamma is the same in every copy
        # two peers and a symmetric term (rkd): one call serves both directions (TapTerm.pair_loss)
        term = self.reference_method.term
        self.shared_term = (
            len(peers) == 2
            and getattr(term, "symmetric", False)
            and self.reference_method.beta > 0
            and not any(p.requires_grad for m in methods.values() for p in m.parameters())
        )

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def prepare(cls, ctx) -> None:
        """Peers from the teacher and student configs (plus student copies), and one method
        per ordered pair, attached (shape-checked) before any data or training."""
        from kdbench.run import attach_method, build_model

        n = int(ctx.cfg.scheme.peers)
        if n < 2:
            from kdbench.errors import ConfigError

            raise ConfigError("scheme.peers", n, "online distillation needs at least 2 peers")
        peers = {"teacher": ctx.teacher, "student": ctx.student}
        for k in range(2, n):
            peers[f"student{k}"] = build_model(ctx.cfg, "student", ctx.dm)
        methods = {}
        for i in peers:
            for j in peers:
                if i != j:
                    m = ctx.method.copy()
                    attach_method(m, peers[i], peers[j], ctx.cfg, ctx.dm, roles=(i, j))
                    methods[_key(i, j)] = m
        ctx.info["peers"], ctx.info["methods"] = peers, methods
        from kdbench.models import count_parameters

        # every direction's trainable parts (regressors, discriminators): aux/params of the run
        ctx.info["aux_params"] = sum(count_parameters(m) for m in methods.values())

    @classmethod
    def from_context(cls, ctx) -> Online:
        return cls(ctx.info["peers"], ctx.info["methods"], ctx.cfg.optim)

    def param_groups(self):
        groups = []
        for i, peer in self.peers.items():
            params = list(peer.parameters())
            for key, m in self.methods.items():
                if key.startswith(f"{i}__from__"):
                    params += list(m.parameters())
            groups.append(params)
        return groups

    # -- steps ------------------------------------------------------------------------------
    def losses(self, batch):
        x, y, idx = batch
        outs = {name: peer(x, self.taps) for name, peer in self.peers.items()}
        targets = {name: o.map(torch.Tensor.detach) for name, o in outs.items()}
        terms: dict[str, torch.Tensor] = {}
        others = len(self.peers) - 1
        for i, s in outs.items():
            for k, v in self.reference_method.hard_label_terms(s, y).items():
                terms[f"{i}/{k}"] = v
            for j in self.peers:
                if j == i:
                    continue
                m = self.methods[_key(i, j)]
                parts = m.distill_terms(
                    s, targets[j], y, self.current_epoch, idx, term=not self.shared_term
                )
                for k, v in parts.items():
                    v = v / others if others > 1 else v  # no kernels for a mean over one peer
                    key = f"{i}/{k}"
                    terms[key] = terms[key] + v if key in terms else v
        if self.shared_term:  # beta * f(A, B) once: each peer gets its own direction's gradient
            (a, out_a), (b, out_b) = outs.items()
            m = self.methods[_key(a, b)]
            value = m.beta * m.term.pair_loss(out_a, out_b)
            terms[f"{a}/{m.name}"] = value
            terms[f"{b}/{m.name}"] = value.detach()  # logged (and summed) once per direction
        return terms

    def evaluate(self, x):
        logits = {name: peer(x).logits for name, peer in self.peers.items()}
        logits["ensemble"] = ensemble_logits(list(logits.values()))
        return logits
