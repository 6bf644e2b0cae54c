"""Ship the student: export, quantize, prune and measure the artifact a user would deploy.

Deployment is a post-step on a finished student (the ``deploy`` config group): its metrics land in
the same MLflow run under ``deploy/<form>/...`` and its files are artifacts of that run. A form is
one module of this package and one ``conf/deploy/<name>.yaml`` naming its :class:`Form` subclass
with ``_target_``:

- ``none`` (default): nothing;
- ``onnx`` (:mod:`kdbench.deploy.onnx`): ONNX (last and best epoch) and torch.export files, the
  ONNX model checked against PyTorch on the test set, timed with ONNX Runtime on the CPU;
- ``int8`` (:mod:`kdbench.deploy.int8`): ``onnx`` plus int8 post-training quantization (static
  with a calibration set drawn from the training data, or dynamic);
- ``qat`` (:mod:`kdbench.deploy.qat`): quantization-aware distillation, the one form that changes
  training (the student trains with fake quantization while the float teacher teaches);
- ``prune`` (:mod:`kdbench.deploy.prune`): structured pruning, then distillation from the
  unpruned teacher.

In a run (:func:`kdbench.run.run`) a form's hooks are called at three points:
:meth:`Form.prepare` once the models are built (before any data or training; ``qat`` puts fake
quantization into the student), :meth:`Form.after_fit` after the scheme's fits (``qat`` takes it
out again, before the float student's efficiency is measured), and :meth:`Form.deploy` through
:func:`post_step` at the end, before the run is FINISHED. ``python -m kdbench.export RUN_ID
deploy=...`` (:mod:`kdbench.export`) calls the same :meth:`Form.deploy` on an earlier run.

Every deployed model is measured the same way (:mod:`kdbench.deploy.runtime`): test accuracy and
ECE with ONNX Runtime over the whole test set, agreement with the float PyTorch student
(``agreement``) and with the teacher (``test/agreement``), file size, parameters, median
batch-1 latency timed in alternation with the PyTorch teacher and the float student (as
:mod:`kdbench.efficiency` times the float models: one thread, same process), ``speedup`` over
the teacher and ``speedup_vs_float`` over the float PyTorch student, and batched throughput.

This module imports neither torch nor ONNX: :func:`check_deploy` runs with the config checks,
before anything heavy is imported.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kdbench.errors import ConfigError, KdbenchError

EXTRA_MODULES = ("onnx", "onnxruntime", "onnxscript")  # the `deploy` extra of pyproject.toml
INSTALL = 'pip install -c constraints.txt ".[deploy]"'
TAG = "kdbench.deploy"  # kdbench.deploy.<form>: the options that made the run's deploy/<form>/...
EXPORTERS = ("dynamo", "torchscript")


def missing_extra() -> str | None:
    """The first module of the ``deploy`` extra that cannot be imported, or None."""
    for name in EXTRA_MODULES:
        if name in sys.modules and sys.modules[name] is None:  # blocked (as a test does)
            return name
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):
            return name
    return None


def require_extra(what: str) -> None:
    """One line naming the missing module and the install command, before any work."""
    missing = missing_extra()
    if missing is not None:
        raise KdbenchError(
            f"{what} needs the deploy extra, and {missing} is not installed: {INSTALL}"
        )


def name_of(cfg: DictConfig) -> str:
    d = cfg.get("deploy")
    return "none" if d is None else str(d.get("name", "none"))


def form_class(d: DictConfig) -> type[Form]:
    """The :class:`Form` subclass a deploy config names with ``_target_`` (no torch import)."""
    target = d.get("_target_")
    cls = None
    if isinstance(target, str):
        module, _, attr = target.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, Form)):
        raise ConfigError(
            "deploy._target_", target, "must name a kdbench.deploy.Form subclass (one per form)"
        )
    return cls


def check_deploy(cfg: DictConfig) -> None:
    """The ``deploy`` group: a known form, the deploy extra installed, the form's options
    (config only; called by :func:`kdbench.validate.check_config` before torch is imported)."""
    d = cfg.get("deploy")
    if d is None or name_of(cfg) == "none":
        return
    if not isinstance(d, DictConfig):
        raise ConfigError("deploy", d, "must be a deploy config: none, onnx, int8, qat or prune")
    cls = form_class(d)
    if str(d.name) != cls.name:
        raise ConfigError("deploy.name", d.name, f"{d._target_} is the form {cls.name!r}")
    require_extra(f"deploy={d.name}")
    cls.check(d)


def form_of(cfg: DictConfig) -> Form | None:
    """The run's deploy form (None for ``deploy=none``)."""
    if name_of(cfg) == "none":
        return None
    return form_class(cfg.deploy)(cfg)


def _int(key: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(key, value, f"must be a whole number >= {low}")


def _bool(key: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(key, value, "must be true or false")


class Form:
    """One way to ship the student. Subclasses set ``name`` (the config's ``name``),
    ``options`` (the deploy keys that determine the deployed artifact: recorded on the run as the
    tag ``kdbench.deploy.<name>``, and the leaderboard's deployed rows are grouped by them), and
    implement :meth:`deploy`; ``check`` validates their own keys (config only)."""

    name = "?"
    options: tuple[str, ...] = ("exporter", "opset")
    needs_teacher_weights = False  # python -m kdbench.export resolves the teacher's weights
    changes_training = False  # only as part of a run: python -m kdbench deploy=<name>

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.d = cfg.deploy

    @classmethod
    def check(cls, d: DictConfig) -> None:
        exporter = d.get("exporter", "dynamo")
        if exporter not in EXPORTERS:
            raise ConfigError("deploy.exporter", exporter, f"must be one of {', '.join(EXPORTERS)}")
        opset = d.get("opset")
        if opset is not None:
            _int("deploy.opset", opset, 13)  # per-channel QuantizeLinear needs opset 13

    def prepare(self, ctx) -> None:
        """Once the run's models are built, before any data or training: the untrained student
        is exported once (the graph does not depend on the weights), so that a student the
        exporter cannot take is refused now, not after its training."""
        self.check_export(ctx.student.model, ctx.dm.input_shape)

    def check_export(self, model, input_shape) -> None:
        import tempfile

        import torch

        from kdbench.deploy import runtime

        exporter, opset = str(self.d.get("exporter", "dynamo")), self.d.get("opset")
        copy = runtime.float_copy(model)
        with tempfile.TemporaryDirectory(prefix="kdbench-export-check-") as tmp:
            with torch.random.fork_rng():  # the run's random state stays as it was
                try:
                    runtime.export_onnx(copy, input_shape, Path(tmp) / "x.onnx", exporter, opset)
                except KdbenchError as exc:
                    raise KdbenchError(f"deploy={self.name}: {exc}") from None

    def after_fit(self, ctx) -> None:
        """After the scheme's fits, before the float student's efficiency is measured."""

    def deploy(self, job: Job) -> dict[str, float]:
        """Write the deployed artifact(s) into ``job.out_dir``; return ``deploy/<form>/...``
        metrics (and record the options of each form measured with :meth:`Job.record`)."""
        raise NotImplementedError


@dataclass
class Job:
    """What a form deploys: the trained student (a TappedModel, last epoch), the weights of its
    best-validation epoch (a state dict, or None), the teacher it is timed against (and, for
    ``prune``, distilled from), the data (test set, calibration and fine-tuning data), and the
    directory its artifacts go to. Measurements shared by several forms are cached here."""

    cfg: DictConfig
    dm: object
    student: object
    teacher: object
    out_dir: Path
    best_state: dict | None = None
    teacher_trained: bool = True  # False: its architecture only (timed, no agreement reported)
    work_dir: Path | None = None  # scratch files (intermediate models, Lightning's root)
    tags: dict[str, str] = field(default_factory=dict)
    cache: dict = field(default_factory=dict)

    def record(self, form: str, d: DictConfig, keys: tuple[str, ...]) -> None:
        """Tag the run with the options that made ``deploy/<form>/...``."""
        options = {k: OmegaConf.to_container(d, resolve=True).get(k) for k in keys if k in d}
        self.tags[f"{TAG}.{form}"] = json.dumps(options, sort_keys=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def run_form(form: Form, job: Job) -> dict[str, float]:
    """``form.deploy(job)`` with every failure as one line naming the form."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kdbench-deploy-") as tmp:
        job.work_dir = Path(tmp)
        try:
            metrics = form.deploy(job)
        except KdbenchError as exc:
            raise KdbenchError(f"deploy={form.name}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - export/quantization failures: one line
            raise KdbenchError(
                f"deploy={form.name} failed: {type(exc).__name__}: {_first_line(exc)}"
            ) from exc
        finally:
            job.work_dir = None
    return {k: float(v) for k, v in metrics.items()}


def teacher_trained(scheme, info: dict) -> bool:
    """Whether the run's teacher network holds trained weights: resolved before the fit
    (offline, takd, datafree, self's generation 0) or trained as a peer (online); not under the
    schemes and methods that train no teacher (byot, pskd; tfkd under offline), whose teacher
    config only names the pair (timed, no agreement reported, nothing distilled from it)."""
    if scheme is None or info.get("teacher_free"):
        return False
    from kdbench.schemes.online import Online

    return bool(scheme.needs_pretrained_teacher) or issubclass(scheme, Online)


def best_weights(out_dir: Path, fit_name: str = "") -> dict | None:
    """The best-validation student weights a run saved (``<fit>_student_best.pt``), if any."""
    import torch

    path = out_dir / f"{fit_name + '_' if fit_name else ''}student_best.pt"
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def post_step(form: Form, ctx, out_dir: Path, logger=None) -> dict[str, float]:
    """The deploy step of a run (:func:`kdbench.run.run`): deploy the run's trained student, its
    artifacts written to ``out_dir`` (the run's artifacts), its options tagged on the run."""
    from kdbench.progress import say

    say(f"deploying the student: deploy={form.name}")
    fit = ctx.scheme.fit_names(ctx.cfg)[-1] if ctx.scheme is not None else ""
    job = Job(
        ctx.cfg,
        ctx.dm,
        ctx.student,
        ctx.teacher,
        out_dir,
        best_weights(out_dir, fit),
        teacher_trained=teacher_trained(ctx.scheme, ctx.info),
    )
    metrics = run_form(form, job)
    if logger is not None:
        for key, value in job.tags.items():
            logger.experiment.set_tag(logger.run_id, key, value)
    return metrics
