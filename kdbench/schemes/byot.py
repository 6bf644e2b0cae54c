"""Self-distillation between the exits of one network: Be Your Own Teacher (BYOT, Zhang et al.
2019, "Be Your Own Teacher: Improve the Performance of Convolutional Neural Networks via Self
Distillation").

The student gets an exit (a shallow classifier) after each of its stages but the last: a
bottleneck (1x1 conv to width/4, a k x k conv of stride k that brings the stage's map to the
deepest stage's size, 1x1 conv to the width of the deepest feature; BatchNorm and ReLU after each),
global average pooling -> the exit's feature ``F_i``, a linear layer -> its logits. The deepest
exit is the network's own classifier, its feature ``F_C`` the pooled penultimate vector (the
``embedding`` tap, else the last stage pooled). The deepest teaches every shallower exit
(METHODS.md, "Variants of schemes and teachers"):

``sum_i [(1 - a) CE(q_i, y) + a T^2 KL(q_C^T || q_i^T) + l ||F_i - F_C||^2]``

How it composes with methods: the method says what moves from the deepest exit (detached) to
each shallow exit, as it would from a teacher to a student, with its own weights: ``gamma`` is
every exit's CE weight (``1 - a``), ``alpha`` and ``temperature`` its KD (``a``, ``T``), and a
logit term (``hard``, ``dkd``, ...) applies between the deepest and each shallow exit at
``beta``. The hint ``l`` is the scheme's own (``scheme.feature_weight``). The paper's objective is
``method=kd method.gamma=0.7 method.alpha=0.3 method.temperature=3`` with ``l = 0.03``;
``method=none`` is deep supervision (CE on every exit) plus the hints (``scheme.feature_weight=0``:
CE alone). Methods whose term needs feature taps of a teacher (fitnet, at, rkd, crd, ...) are
refused: the exits have logits and one feature, no stages or hints.

No teacher network: the transfer set is not used (nothing labels it). Reported per exit i
(1 = shallowest; the last is the network's own classifier, equal to ``test/acc``):
``test/exit<i>/acc`` (and ``_best``), and, with ``efficiency.enabled``, the batch-1 latency
(``efficiency/exit<i>/latency_ms``), FLOPs and parameters of the network truncated at that exit.
The deployed student is the network without the exits; their parameters count as
``aux/params`` and are saved as ``exits.pt``.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from kdbench.errors import ConfigError
from kdbench.losses import byot_feature_loss
from kdbench.methods import Method
from kdbench.schemes.base import SchemeModule
from kdbench.taps import Outputs, TappedModel

TAPS = frozenset({"stages", "embedding"})


def deepest_feature(out: Outputs) -> torch.Tensor:
    """``F_C``: the embedding tap (flattened), else the last stage's output pooled over space."""
    emb = out.features.get("embedding")
    if isinstance(emb, torch.Tensor):
        return emb.flatten(1)
    last = out.features["stages"][-1]
    return last.flatten(2).mean(2) if last.dim() > 2 else last


class ExitHead(nn.Module):
    """One shallow exit: BYOT's bottleneck (its ``branchBottleNeck``), pooling and a classifier.
    ``forward(stage_output) -> (feature F_i, logits)``."""

    def __init__(
        self, stage_shape: tuple, deepest_shape: tuple, width: int, num_classes: int
    ) -> None:
        super().__init__()
        channels, spatial = stage_shape[0], tuple(stage_shape[1:])
        mid = max(width // 4, 1)
        if not spatial:  # vector stages (a user's model): the bottleneck as linear layers
            self.bottleneck = nn.Sequential(
                nn.Linear(channels, mid),
                nn.BatchNorm1d(mid),
                nn.ReLU(),
                nn.Linear(mid, width),
                nn.BatchNorm1d(width),
                nn.ReLU(),
            )
        else:
            dims = len(spatial)
            conv = nn.Conv1d if dims == 1 else nn.Conv2d
            bn = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
            pool = nn.AdaptiveAvgPool1d if dims == 1 else nn.AdaptiveAvgPool2d
            deep = tuple(deepest_shape[1:]) if len(deepest_shape) == len(stage_shape) else spatial
            # kernel = stride = how many times larger the stage's map is than the deepest's
            stride = tuple(max(1, a // b) for a, b in zip(spatial, deep, strict=True))
            self.bottleneck = nn.Sequential(
                conv(channels, mid, 1, bias=False),
                bn(mid),
                nn.ReLU(),
                conv(mid, mid, stride, stride, bias=False),
                bn(mid),
                nn.ReLU(),
                conv(mid, width, 1, bias=False),
                bn(width),
                nn.ReLU(),
                pool(1),
                nn.Flatten(),
            )
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.bottleneck(x)
        return feature, self.fc(feature)


def build_exits(student: TappedModel, input_shape, num_classes: int, name: str) -> nn.ModuleList:
    """One :class:`ExitHead` per stage output but the last, sized on a dummy batch (eval mode).
    A student with fewer than 2 stage outputs is refused (one line)."""
    x = torch.zeros(2, *input_shape)
    was_training = student.training
    student.eval()
    with torch.no_grad():
        out = student(x, TAPS)
    student.train(was_training)
    stages = out.features.get("stages")
    stages = stages if isinstance(stages, list) else [] if stages is None else [stages]
    if len(stages) < 2 or any(s.dim() not in (2, 3, 4) for s in stages):
        raise ConfigError(
            "student",
            name,
            f"scheme=byot puts exits on the student's stages but {name} has "
            f"{len(stages)} usable 'stages' tap outputs (needs 2 or more, vectors or 1-D/2-D "
            "maps): use student=cnn1d_small (or set student.taps.stages to 2 or more module paths)",
        )
    width = deepest_feature(out).shape[1]
    deep = tuple(stages[-1].shape[1:])
    return nn.ModuleList(
        ExitHead(tuple(s.shape[1:]), deep, width, num_classes) for s in stages[:-1]
    )


class BYOT(SchemeModule):
    supports_language_models = False  # not built for logits [B, L, V] yet
    needs_pretrained_teacher = False
    accepts_teacher_ensemble = False

    def __init__(
        self,
        student: TappedModel,
        exits: nn.ModuleList,
        method: Method,
        optim_cfg,
        feature_weight: float = 0.03,
    ) -> None:
        super().__init__(optim_cfg)
        self.student, self.exits, self.method = student, exits, method
        self.feature_weight = float(feature_weight)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def prepare(cls, ctx) -> None:
        """The feature weight and the method checked, the exits built on a dummy batch."""
        from kdbench.modelspec import model_name

        cfg = ctx.cfg
        fw = cfg.scheme.get("feature_weight", 0.03)
        if not isinstance(fw, int | float) or isinstance(fw, bool) or not 0 <= fw < float("inf"):
            raise ConfigError(
                "scheme.feature_weight", fw, "must be a finite number >= 0 (0: no hints)"
            )
        if getattr(ctx.method, "teacher_free", False):
            raise ConfigError(
                "method",
                cfg.method.name,
                "scheme=byot has the deepest exit teach the others, and method="
                f"{cfg.method.name} distils from a target of its own, not from a network: "
                "pick a method that learns from a teacher (kd, dkd, hard, ...) or none",
            )
        if ctx.method.taps:
            raise ConfigError(
                "method",
                cfg.method.name,
                "scheme=byot distils between the student's own exits, which have logits and no "
                f"feature taps, and method={cfg.method.name} needs the "
                f"{'/'.join(sorted(ctx.method.taps))} tap of a teacher: pick a logit method "
                "(kd, dkd, hard, ...) or none (the exits' feature hints are "
                "scheme.feature_weight)",
            )
        name = model_name(cfg.student)
        ctx.info["exits"] = build_exits(ctx.student, ctx.dm.input_shape, ctx.dm.num_classes, name)
        method = ctx.method
        if method.term is not None and method.beta > 0:  # its modules (e.g. a discriminator),
            # one for every exit: exit logits against the deepest's, of the same shape
            z = Outputs(torch.zeros(2, ctx.dm.num_classes))
            method.term.build(cfg.method.name, z, z, f"{name} (an exit)", f"{name} (the deepest)")

    @classmethod
    def from_context(cls, ctx) -> BYOT:
        fw = ctx.cfg.scheme.get("feature_weight", 0.03)
        return cls(ctx.student, ctx.info["exits"], ctx.method, ctx.cfg.optim, fw)

    @classmethod
    def execute(cls, ctx, runner) -> dict[str, float]:
        from kdbench.models import count_parameters

        ctx.dm.use_transfer = False  # no teacher: only labelled samples (as in the paper)
        module = cls.from_context(ctx)
        metrics = runner.fit_and_test(module, ctx.student.model)
        torch.save(module.exits.state_dict(), runner.artifacts / "exits.pt")
        ctx.info["aux_params"] = count_parameters(module.exits)
        if ctx.cfg.efficiency.enabled:
            metrics.update(exit_efficiency(ctx.student, module.exits, ctx.dm, ctx.cfg.efficiency))
        return metrics

    # -- steps ------------------------------------------------------------------------------
    def losses(self, batch):
        x, y, idx = batch
        out = self.student(x, TAPS)
        stages = out.features["stages"]
        deepest = len(self.exits) + 1
        target = Outputs(out.logits.detach(), {})
        f_c = deepest_feature(out).detach() if self.feature_weight > 0 else None
        terms: dict[str, torch.Tensor] = {}
        for i, head in enumerate(self.exits, start=1):
            f_i, z_i = head(stages[i - 1])
            s = Outputs(z_i, {})
            for k, v in self.method.hard_label_terms(s, y).items():
                terms[f"exit{i}/{k}"] = v
            for k, v in self.method.distill_terms(s, target, y, self.current_epoch, idx).items():
                terms[f"exit{i}/{k}"] = v
            if f_c is not None:
                terms[f"exit{i}/feature"] = self.feature_weight * byot_feature_loss(f_i, f_c)
        for k, v in self.method.hard_label_terms(out, y).items():
            terms[f"exit{deepest}/{k}"] = v
        return terms

    def evaluate(self, x):
        out = self.student(x, TAPS)
        logits = {"student": out.logits}
        for i, head in enumerate(self.exits, start=1):
            logits[f"exit{i}"] = head(out.features["stages"][i - 1])[1]
        logits[f"exit{len(self.exits) + 1}"] = out.logits
        return logits


# -- early-exit efficiency ------------------------------------------------------------------


class _Exit(Exception):
    def __init__(self, output) -> None:
        super().__init__()
        self.output = output


class EarlyExit(nn.Module):
    """The student run up to one stage, then that stage's exit: what a deployment that stops
    there computes (the stage's forward hook ends the network's forward). Use it inside
    :meth:`hooked` only; outside, the hook is not there."""

    def __init__(self, model: nn.Module, stage: str, head: ExitHead) -> None:
        super().__init__()
        self.model, self.head, self.stage = model, head, stage
        self.active = False  # the hook stops only this exit's forwards

    def hooked(self):
        def stop(_module, _inputs, output):
            if self.active:
                raise _Exit(output)

        return self.model.get_submodule(self.stage).register_forward_hook(stop)

    def forward(self, x):
        self.active = True
        try:
            self.model(x)
        except _Exit as done:
            return self.head(done.output)[1]
        finally:
            self.active = False
        raise RuntimeError(f"stage {self.stage} did not run")


@torch.no_grad()
def _called_parameters(model: nn.Module, x: torch.Tensor) -> int:
    """Parameters of the modules that one forward of ``model`` calls."""
    called: set[nn.Module] = set()
    handles = [
        m.register_forward_pre_hook(lambda mod, _inp: called.add(mod)) for m in model.modules()
    ]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    params = {id(p): p for m in called for p in m.parameters(recurse=False)}
    return int(sum(p.numel() for p in params.values()))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def exit_latencies(
    model: nn.Module, stages: list[str], exits: nn.ModuleList, x: torch.Tensor, runs: int
) -> list[float]:
    """Median batch-1 latency (ms) up to each exit, the last the whole network: per run, one
    forward of the whole network stamps the time at which each exit's stage has returned
    (a forward hook; synchronised on CUDA), then each exit's head runs on its stage's output;
    exit i's latency is the median of its stage's stamp plus the median of its head's time. No
    truncated forward is run: stopping a forward midway (an exception) costs more than a small
    network's stage."""
    device = str(x.device)
    stamps: dict[int, tuple[float, torch.Tensor]] = {}

    def stamp(k):
        def hook(_module, _inputs, output):
            _sync(device)
            stamps[k] = (time.perf_counter(), output)

        return hook

    handles = [model.get_submodule(p).register_forward_hook(stamp(k)) for k, p in enumerate(stages)]
    n = len(exits)
    prefix: list[list[float]] = [[] for _ in range(n)]
    heads: list[list[float]] = [[] for _ in range(n)]
    whole: list[float] = []
    try:
        for i in range(5 + runs):  # 5 warm-up runs
            start = time.perf_counter()
            model(x)
            _sync(device)
            end = time.perf_counter()
            for k in range(n):
                t0 = time.perf_counter()
                exits[k](stamps[k][1])
                _sync(device)
                if i >= 5:
                    heads[k].append(time.perf_counter() - t0)
                    prefix[k].append(stamps[k][0] - start)
            if i >= 5:
                whole.append(end - start)
            stamps.clear()
    finally:
        for h in handles:
            h.remove()
    med = statistics.median
    return [1000 * (med(p) + med(h)) for p, h in zip(prefix, heads, strict=True)] + [
        1000 * med(whole)
    ]


def exit_efficiency(student: TappedModel, exits: nn.ModuleList, dm, cfg) -> dict[str, float]:
    """Per exit i, the network truncated there (the last: the whole network), measured as
    :mod:`kdbench.efficiency` measures a model: median batch-1 latency (:func:`exit_latencies`;
    on the CPU with one thread), FLOPs per sample and the parameters its forward uses."""
    from kdbench.efficiency import static_figures

    device = str(cfg.get("device", "cpu"))
    model = student.model.to(device)
    exits.to(device)
    modes = model.training, exits.training
    model.eval(), exits.eval()
    paths = student.taps["stages"]
    paths = list(paths[: len(exits)]) if isinstance(paths, list) else [paths]
    truncated = [EarlyExit(model, p, h) for p, h in zip(paths, exits, strict=True)]
    handles = [t.hooked() for t in truncated]
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # as kdbench.efficiency.latencies: batch 1, one thread
    try:
        x = torch.randn(1, *dm.input_shape, device=device)
        lat = exit_latencies(model, paths, exits, x, int(cfg.latency_runs))
        out: dict[str, float] = {}
        for i, (net, ms) in enumerate(zip([*truncated, model], lat, strict=True), start=1):
            out[f"efficiency/exit{i}/latency_ms"] = ms
            out[f"efficiency/exit{i}/flops"] = static_figures(net, net, dm.input_shape)["flops"]
            out[f"efficiency/exit{i}/params"] = _called_parameters(net, x)
    finally:
        torch.set_num_threads(threads)
        for h in handles:
            h.remove()
        model.train(modes[0]), exits.train(modes[1])
    return out
