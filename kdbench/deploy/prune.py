"""``deploy=prune``: structured pruning of the trained student, then distillation from the
unpruned teacher ("prune, then distil"), then ONNX export and measurement.

Which channels can go (:func:`prunable_groups`): the network is traced with ``torch.fx``; a
Linear or Conv layer (not grouped) is a *producer* when its output reaches exactly one other
Linear or Conv layer (not grouped: the *consumer*) through layers that act on each channel alone:
BatchNorm and depthwise convolutions (pruned along), activations, dropout and pooling, and a
flatten of a globally pooled map (one value per channel). An output used anywhere else (a
residual sum, a concatenation, the logits, a second consumer) keeps all its channels: in a
ResNet the channels inside each block are pruned, those the shortcuts add are not (the rule of
Li et al., "Pruning filters for efficient ConvNets", ICLR 2017).

Which channels go (:func:`l1_keep`): in every producer the ``round(sparsity * C)`` output
channels (neurons) whose weights have the smallest L1 norm ``sum |W[c]|`` (Li et al. 2017), at
least one channel kept. They are removed physically (:func:`apply`): the producer's weight rows
and bias, the BatchNorm and depthwise entries and the consumer's weight columns, in place (the
module objects stay, so feature taps keep working), so the pruned network is smaller and faster,
not merely sparse.

Then the pruned student is distilled from the frozen, unpruned teacher for
``deploy.finetune_epochs`` epochs with Hinton KD (``deploy.finetune``: gamma, alpha,
temperature) and the run's optimizer, on the labelled data and the transfer set (the Minitron
recipe: Muralidharan et al., "Compact language models via pruning and knowledge distillation",
2024), exported to ONNX (``student.pruned.onnx``, and ``student.pruned.pt2``) and measured:
``deploy/prune/sparsity`` (the share of the student's parameters removed), ``channel_sparsity``
(of the prunable channels), ``test/acc_before_finetune`` (right after pruning, PyTorch),
``test/acc`` (ONNX Runtime, after distillation), ``params``, ``size_bytes``, ``latency_ms``,
``speedup`` ... (:func:`kdbench.deploy.runtime.measure`; ``agreement`` is with the unpruned
float student).

``deploy.source=teacher`` prunes a copy of the teacher itself instead, and distils it from the
unpruned teacher: Minitron's recipe, where the pruned teacher is the student that ships
(``sparsity`` and the parameter counts are then the teacher's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kdbench.deploy import Form, Job, _int
from kdbench.errors import ConfigError, KdbenchError

# modules that act on each channel alone (a channel's output depends on that channel only)
_PASS_MODULES = (
    "ReLU ReLU6 LeakyReLU PReLU ELU SELU CELU GELU SiLU Mish Hardswish Hardsigmoid Hardtanh "
    "Sigmoid Tanh Softplus Identity Dropout Dropout1d Dropout2d Dropout3d AlphaDropout "
    "MaxPool1d MaxPool2d MaxPool3d AvgPool1d AvgPool2d AvgPool3d AdaptiveAvgPool1d "
    "AdaptiveAvgPool2d AdaptiveAvgPool3d AdaptiveMaxPool1d AdaptiveMaxPool2d AdaptiveMaxPool3d"
).split()
_PASS_FUNCTIONS = (
    "relu relu_ relu6 leaky_relu elu selu celu gelu silu mish hardswish hardsigmoid hardtanh "
    "sigmoid tanh softplus dropout dropout1d dropout2d dropout3d max_pool1d max_pool2d "
    "max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d "
    "adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d contiguous"
).split()
_FLATTEN = ("flatten", "view", "reshape", "squeeze")
_SHAPE_ONLY = ("size", "dim")  # uses of a tensor that read its shape, not its values


@dataclass
class Group:
    """A producer's output channels, with the layers that are pruned along with them."""

    producer: str
    followers: list[str] = field(default_factory=list)  # BatchNorm / depthwise conv paths
    consumer: str = ""


def _layers():
    from torch import nn

    return nn.Linear, (nn.Conv1d, nn.Conv2d, nn.Conv3d), nn.modules.batchnorm._BatchNorm


def _is_dense(m) -> bool:
    linear, convs, _ = _layers()
    return isinstance(m, linear) or (isinstance(m, convs) and m.groups == 1)


def _is_depthwise(m) -> bool:
    _, convs, _ = _layers()
    return isinstance(m, convs) and m.groups == m.in_channels == m.out_channels > 1


def _name(target) -> str:
    return getattr(target, "__name__", str(target)).rsplit(".", 1)[-1]


def _channel_flatten(node) -> bool:
    """A flatten/view of a map with one value per channel into (batch, channels)."""
    src = node.args[0] if node.args else None
    before = getattr(src, "meta", {}).get("tensor_meta")
    after = node.meta.get("tensor_meta")
    if before is None or after is None:
        return False
    shape_in, shape_out = tuple(before.shape), tuple(after.shape)
    return (
        len(shape_out) == 2
        and len(shape_in) >= 2
        and math.prod(shape_in[2:]) == 1
        and shape_out == shape_in[:2]
    )


def _trace(model, input_shape):
    """``torch.fx``'s symbolic trace; where the forward branches on the input's shape (``if
    height >= 64``, as the VGGs do), a trace with meta tensors of the data's shape instead."""
    import inspect
    import warnings

    import torch
    from torch.fx import symbolic_trace

    try:
        return symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - shape-dependent control flow: trace with shapes
        from torch.fx.experimental.meta_tracer import symbolic_trace as meta_trace

        try:
            name = next(iter(inspect.signature(model.forward).parameters))
            x = torch.zeros(2, *input_shape, device="meta")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # metadata it cannot compute: ShapeProp does
                return meta_trace(model, meta_args={name: x})
        except Exception:  # noqa: BLE001 - report the plain trace's reason
            raise exc from None


def prunable_groups(model, input_shape) -> list[Group]:
    """The producers whose output channels can be removed (see the module docstring)."""
    import torch
    from torch.fx.passes.shape_prop import ShapeProp

    _, _, batchnorm = _layers()
    try:
        gm = _trace(model, input_shape)
        ShapeProp(gm).propagate(torch.zeros(2, *input_shape))
    except Exception as exc:  # noqa: BLE001 - control flow torch.fx cannot trace
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise KdbenchError(
            f"torch.fx cannot trace {type(model).__name__} to find its prunable channels ({first})"
        ) from None
    modules = dict(gm.named_modules())
    groups = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _is_dense(modules[node.target]):
            continue
        group, cur = Group(str(node.target)), node
        while True:
            users = [
                u
                for u in cur.users
                if not (u.op == "call_method" and u.target in _SHAPE_ONLY)
                and not (u.op == "call_function" and _name(u.target) == "getattr")
            ]
            if len(users) != 1 or users[0].args[:1] != (cur,):
                break
            u = users[0]
            if u.op == "call_module":
                m = modules[u.target]
                if _is_dense(m):
                    group.consumer = str(u.target)
                    break
                if isinstance(m, batchnorm) or _is_depthwise(m):
                    group.followers.append(str(u.target))
                elif type(m).__name__ in _PASS_MODULES:
                    pass
                elif type(m).__name__ == "Flatten" and _channel_flatten(u):
                    pass
                else:
                    break
            elif u.op in ("call_function", "call_method"):
                name = _name(u.target)
                if name in _FLATTEN:
                    if not _channel_flatten(u):
                        break
                elif name not in _PASS_FUNCTIONS:
                    break
            else:
                break
            cur = u
        if group.consumer:
            groups.append(group)
    return groups


def l1_keep(weight, sparsity: float):
    """Indices (ascending) of the output channels to keep: all but the ``round(sparsity * C)``
    with the smallest L1 norm of their weights, at least one."""
    import torch

    norms = weight.detach().abs().flatten(1).sum(1)
    channels = len(norms)
    keep = max(1, channels - round(sparsity * channels))
    order = torch.argsort(norms, descending=True, stable=True)  # ties: the lower index stays
    return order[:keep].sort().values


def _slice(module, name: str, idx, dim: int) -> None:
    from torch import nn

    t = getattr(module, name, None)
    if t is None:
        return
    new = t.detach().index_select(dim, idx).clone()
    if isinstance(t, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        setattr(module, name, new)


def apply(model, group: Group, keep) -> None:
    """Remove the producer's channels that are not in ``keep``, in place."""
    linear, _, batchnorm = _layers()
    producer = model.get_submodule(group.producer)
    _slice(producer, "weight", keep, 0)
    _slice(producer, "bias", keep, 0)
    if isinstance(producer, linear):
        producer.out_features = len(keep)
    else:
        producer.out_channels = len(keep)
    for path in group.followers:
        m = model.get_submodule(path)
        if isinstance(m, batchnorm):
            for name in ("weight", "bias", "running_mean", "running_var"):
                _slice(m, name, keep, 0)
            m.num_features = len(keep)
        else:  # depthwise conv
            _slice(m, "weight", keep, 0)
            _slice(m, "bias", keep, 0)
            m.in_channels = m.out_channels = m.groups = len(keep)
    consumer = model.get_submodule(group.consumer)
    _slice(consumer, "weight", keep, 1)
    if isinstance(consumer, linear):
        consumer.in_features = len(keep)
    else:
        consumer.in_channels = len(keep)


def prune(model, input_shape, sparsity: float) -> tuple[int, int]:
    """Prune ``model`` in place; return (prunable channels, channels removed)."""
    groups = prunable_groups(model, input_shape)
    if not groups:
        raise KdbenchError(
            f"{type(model).__name__} has no prunable channels: no Linear/Conv output reaches "
            "exactly one other Linear/Conv through per-channel layers"
        )
    keeps = [l1_keep(model.get_submodule(g.producer).weight, sparsity) for g in groups]
    total = sum(model.get_submodule(g.producer).weight.shape[0] for g in groups)
    for g, keep in zip(groups, keeps, strict=True):  # all chosen first, from the trained weights
        apply(model, g, keep)
    return total, total - sum(len(k) for k in keeps)


def finetune(job: Job, student, d) -> None:
    """Distil the pruned ``student`` (a TappedModel) from the frozen, unpruned teacher."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from kdbench.methods import Method
    from kdbench.run import make_trainer
    from kdbench.schemes.offline import Offline, cache_options

    f = d.finetune
    method = Method("kd", "response", f.gamma, f.alpha, 0.0, f.temperature)
    module = Offline(student, job.teacher, method, job.cfg.optim, **cache_options(job.cfg))
    module.tag_prefix = "pruned"  # the progress line: "fitting the student (pruned)"
    dm = job.dm
    use_transfer, dm.use_transfer = dm.use_transfer, True
    try:
        L.seed_everything(job.cfg.seed, workers=True, verbose=False)
        trainer = make_trainer(
            job.cfg,
            job.work_dir,
            max_epochs=int(d.finetune_epochs),
            logger=CSVLogger(job.work_dir, name="finetune"),  # scratch (a trainer with a logger
            enable_checkpointing=False,  # is a student's fit for the progress lines)
        )
        trainer.fit(module, datamodule=dm)
    finally:
        dm.use_transfer = use_transfer
    student.cpu().eval()
    job.teacher.cpu()  # (measured on the CPU next)


SOURCES = ("student", "teacher")


class PruneForm(Form):
    name = "prune"
    options = ("exporter", "opset", "source", "sparsity", "finetune_epochs", "finetune")
    needs_teacher_weights = True  # distilled from it

    @classmethod
    def check(cls, d) -> None:
        super().check(d)
        if d.get("source", "student") not in SOURCES:
            raise ConfigError("deploy.source", d.get("source"), "must be student or teacher")
        s = d.get("sparsity")
        if not (isinstance(s, int | float) and not isinstance(s, bool) and 0 < s < 1):
            raise ConfigError("deploy.sparsity", s, "must be a number in (0, 1)")
        _int("deploy.finetune_epochs", d.get("finetune_epochs"), 0)
        f = d.get("finetune") or {}
        for key, low in (("gamma", 0), ("alpha", 0), ("temperature", 1e-9)):
            v = f.get(key)
            if not (isinstance(v, int | float) and not isinstance(v, bool) and v >= low):
                raise ConfigError(f"deploy.finetune.{key}", v, f"must be a number >= {low:g}")

    def source(self, student, teacher):
        """The TappedModel that is pruned: the trained student, or (``deploy.source=teacher``)
        the teacher itself."""
        if str(self.d.get("source", "student")) == "student":
            return student
        if not hasattr(teacher, "taps"):  # an EnsembleTeacher: several networks
            raise KdbenchError("deploy.source=teacher prunes one network, not teacher=ensemble")
        return teacher

    def prepare(self, ctx) -> None:
        """Before any training: the student can be exported, the pruned network has channels
        to prune (and can be exported: the pruned graph is the same but narrower)."""
        from kdbench.deploy import runtime, teacher_trained

        uses_teacher = str(self.d.get("source", "student")) == "teacher" or (
            int(self.d.get("finetune_epochs") or 0) > 0
        )
        if uses_teacher and not teacher_trained(ctx.scheme, ctx.info):
            why = (
                f"method={ctx.cfg.method.name}"
                if ctx.info.get("teacher_free")
                else f"scheme={ctx.cfg.scheme.name}"
            )
            raise KdbenchError(
                f"deploy=prune distils from the trained teacher, and a {why} run trains none: "
                "use deploy=onnx or deploy=int8, or deploy.finetune_epochs=0"
            )
        super().prepare(ctx)  # (the export check: after the cheap refusal above)
        try:
            base = self.source(ctx.student, ctx.teacher)
            prune(runtime.float_copy(base.model), ctx.dm.input_shape, float(self.d.sparsity))
        except KdbenchError as exc:
            raise KdbenchError(f"deploy=prune: {exc}") from None

    def deploy(self, job: Job) -> dict[str, float]:
        import copy

        import torch

        from kdbench.deploy import runtime
        from kdbench.metrics import accuracy
        from kdbench.progress import say

        d = self.d
        ref = runtime.Reference.of(job)
        base = self.source(job.student, job.teacher)
        student = copy.deepcopy(base).cpu().float()  # the TappedModel: taps kept
        before = runtime.count_parameters(student.model)
        prunable, removed = prune(student.model, ref.input_shape, float(d.sparsity))
        p = "deploy/prune/"
        metrics = {
            f"{p}sparsity": 1 - runtime.count_parameters(student.model) / before,
            f"{p}channel_sparsity": removed / prunable,
            f"{p}test/acc_before_finetune": accuracy(
                runtime.predict_torch(student.model, job.dm), ref.y
            ),
        }
        if int(d.finetune_epochs) > 0:
            what = d.get("source", "student")
            say(f"distilling the pruned {what} for {d.finetune_epochs} epochs")
            student.requires_grad_(True)  # (a copy of the frozen teacher has none)
            finetune(job, student, d)
        model = runtime.float_copy(student.model)
        path = job.out_dir / "student.pruned.onnx"
        ep = runtime.export_onnx(model, ref.input_shape, path, str(d.exporter), d.opset)
        if ep is not None:
            torch.export.save(ep, job.out_dir / "student.pruned.pt2")
        measured, _ = runtime.measure("prune", path, job, runtime.count_parameters(model))
        metrics.update(measured)
        job.record("prune", d, self.options)
        return metrics
