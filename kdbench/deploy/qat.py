"""``deploy=qat``: quantization-aware distillation, the deploy form that changes training.

The student trains with fake int8 quantization (:mod:`kdbench.deploy.fakequant`: weights per
output channel, the input of every Linear/Conv per tensor) under the run's scheme and method, so
the float teacher teaches a student that computes as its int8 version will (the teacher is
never quantized). The run's ``test/acc`` is that fake-quantized student's. After the fits the
fake quantization is taken out (the float student's efficiency is measured as in any run), and
the student is exported and quantized for ONNX Runtime as ``deploy=int8 calibration=static``
does, with the same calibration: artifact ``student.qat.int8.onnx``, metrics
``deploy/qat/test/acc``, ``agreement``, ``latency_ms``, ``throughput``, ``size_bytes``,
``speedup`` ... (:func:`kdbench.deploy.runtime.measure`). With ``method=none`` it is plain
quantization-aware training. Works with the schemes that train the student config's network
once (``offline``, ``online``; not ``self``, whose generations are fresh networks).
"""

from __future__ import annotations

from kdbench.deploy import Form, Job, _bool, _int
from kdbench.errors import ConfigError


class QatForm(Form):
    name = "qat"
    options = ("exporter", "opset", "calibration_samples", "per_channel", "ema")
    changes_training = True

    @classmethod
    def check(cls, d) -> None:
        super().check(d)
        _int("deploy.calibration_samples", d.get("calibration_samples"), 1)
        _bool("deploy.per_channel", d.get("per_channel"))
        ema = d.get("ema")
        if not (isinstance(ema, int | float) and not isinstance(ema, bool) and 0 < ema <= 1):
            raise ConfigError("deploy.ema", ema, "must be a number in (0, 1]")

    def prepare(self, ctx) -> None:
        from kdbench.deploy.fakequant import add_fake_quant
        from kdbench.modelspec import model_name

        scheme = ctx.scheme
        if scheme is not None and scheme.student_role != "student":
            raise ConfigError(
                "deploy",
                "qat",
                f"scheme={ctx.cfg.scheme.name} trains a new network in every generation: "
                "quantization-aware distillation works with schemes that train the student "
                "once (scheme=offline or online)",
            )
        super().prepare(ctx)  # the float student can be exported
        if add_fake_quant(ctx.student.model, self.d.ema, self.d.per_channel) == 0:
            raise ConfigError(
                "deploy",
                "qat",
                f"the student {model_name(ctx.cfg.student)} has no Linear or Conv layer to "
                "quantize",
            )

    def after_fit(self, ctx) -> None:
        from kdbench.deploy.fakequant import remove_fake_quant

        remove_fake_quant(ctx.student.model)

    def deploy(self, job: Job) -> dict[str, float]:
        from kdbench.deploy import runtime
        from kdbench.deploy.int8 import quantize

        d = self.d
        ref = runtime.Reference.of(job)
        src = job.work_dir / "student.qat.float.onnx"
        runtime.export_onnx(
            runtime.float_copy(ref.student), ref.input_shape, src, str(d.exporter), d.opset
        )
        dst = job.out_dir / "student.qat.int8.onnx"
        quantize(src, dst, job, True, int(d.calibration_samples), bool(d.per_channel))
        metrics, _ = runtime.measure("qat", dst, job)
        job.record("qat", d, self.options)
        return metrics
