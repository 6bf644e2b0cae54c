"""``deploy=int8``: ``deploy=onnx`` plus int8 post-training quantization with ONNX Runtime.

The float ONNX export (``student.onnx``, with its ``deploy/onnx/...`` metrics) is pre-processed
(shape inference, graph optimisation: BatchNorm folded into the convolutions) and quantized:

- ``deploy.calibration=static``: weights int8 (symmetric, per output channel with
  ``deploy.per_channel``), activations uint8 with ranges fixed beforehand by MinMax calibration on
  ``deploy.calibration_samples`` samples of the training split, in QDQ format (ONNX Runtime
  fuses each QuantizeLinear/DequantizeLinear pair with its operator into an int8 kernel);
- ``deploy.calibration=dynamic``: weights int8, activation ranges computed per batch at run time.

Artifact ``student.int8.onnx``; metrics ``deploy/int8/test/acc``, ``agreement`` (top-1 with the
float PyTorch student), ``latency_ms``, ``throughput``, ``size_bytes``, ``speedup`` ... (see
:func:`kdbench.deploy.runtime.measure`).
"""

from __future__ import annotations

from pathlib import Path

from kdbench.deploy import Job, _bool, _int
from kdbench.deploy.onnx import OnnxForm
from kdbench.errors import ConfigError

CALIBRATIONS = ("static", "dynamic")


def quantize(src: Path, dst: Path, job: Job, static: bool, samples: int, per_channel: bool):
    """Quantize the float ONNX file ``src`` to ``dst`` (see the module docstring)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from kdbench.deploy import runtime

    pre = job.work_dir / f"{dst.stem}.pre.onnx"
    quant_pre_process(str(src), str(pre))
    if not static:
        quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)
        return
    x = runtime.calibration_inputs(job.dm, samples, job.cfg.seed)

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{runtime.INPUT: x[i : i + 256]} for i in range(0, len(x), 256)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(
        str(pre),
        str(dst),
        Batches(),
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )


class Int8Form(OnnxForm):
    name = "int8"
    options = ("exporter", "opset", "calibration", "calibration_samples", "per_channel")

    @classmethod
    def check(cls, d) -> None:
        super().check(d)
        if d.get("calibration") not in CALIBRATIONS:
            raise ConfigError(
                "deploy.calibration", d.get("calibration"), "must be static or dynamic"
            )
        _int("deploy.calibration_samples", d.get("calibration_samples"), 1)
        _bool("deploy.per_channel", d.get("per_channel"))

    def deploy(self, job: Job) -> dict[str, float]:
        from kdbench.deploy import runtime

        metrics = self.export_float(job)
        dst = job.out_dir / "student.int8.onnx"
        d = self.d
        quantize(
            job.cache["onnx"],
            dst,
            job,
            static=d.calibration == "static",
            samples=int(d.calibration_samples),
            per_channel=bool(d.per_channel),
        )
        measured, _ = runtime.measure("int8", dst, job)
        metrics.update(measured)
        job.record("int8", d, self.options)
        return metrics
