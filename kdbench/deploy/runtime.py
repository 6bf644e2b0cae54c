"""What every deploy form shares: ONNX export, ONNX Runtime sessions, test-set predictions and
the measurements of a deployed model (see :mod:`kdbench.deploy` for the list)."""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.metrics import accuracy, agreement, expected_calibration_error

INPUT, OUTPUT = "x", "logits"  # the names of the exported graph's input and output


def float_copy(model: nn.Module) -> nn.Module:
    """A float32 copy of ``model`` on the CPU in eval mode (the original is left as it is)."""
    return copy.deepcopy(model).cpu().float().eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def export_onnx(model: nn.Module, input_shape, path: Path, exporter: str, opset: int | None):
    """Export ``model`` (an ``nn.Module`` returning logits) to the ONNX file ``path``, with a
    dynamic batch axis; return its ``torch.export.ExportedProgram`` (the dynamo exporter's
    input, saved as the ``.pt2`` artifact) or None (torchscript exporter). A model that cannot
    be exported is a one-line :class:`KdbenchError` with the exporter's reason."""
    import contextlib
    import io
    import logging

    quiet = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "onnxruntime")
    quiet += ("torch.fx.experimental.symbolic_shapes",)
    for name in quiet:  # INFO per pass, torchvision notices, guard warnings of a failed export
        logging.getLogger(name).setLevel(logging.ERROR)
    model = model.eval()
    x = torch.zeros(2, *input_shape)  # 2: torch.export specialises a batch of 1
    # (a failed torch.export prints the partial graph to stderr: the reason is in the exception)
    with contextlib.redirect_stderr(io.StringIO()):
        return _export(model, x, path, exporter, opset)


def _export(model, x, path: Path, exporter: str, opset: int | None):
    try:
        if exporter == "dynamo":
            ep = torch.export.export(
                model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False
            )
            torch.onnx.export(
                ep,
                (x,),
                str(path),
                dynamo=True,
                input_names=[INPUT],
                output_names=[OUTPUT],
                opset_version=opset,
                external_data=False,  # one self-contained file (models under 2 GB)
                verbose=False,
            )
            return ep
        with warnings.catch_warnings():  # PyTorch's deprecation notice of this exporter
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                opset_version=opset or 17,
            )
        return None
    except Exception as exc:  # noqa: BLE001 - any exporter failure is the model's: one line
        other = "torchscript" if exporter == "dynamo" else "dynamo"
        raise KdbenchError(
            f"the student cannot be exported to ONNX by the {exporter} exporter "
            f"({type(exc).__name__}: {_first_line(exc)}); deploy.exporter={other} tries the other"
        ) from None


class OrtModel:
    """An ONNX file run by ONNX Runtime on the CPU with ``threads`` intra-op threads: called on
    a torch batch it returns the logits as a NumPy array (what :mod:`kdbench.efficiency` times)."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(threads))
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        return self.session.run(None, {self.input: x.detach().cpu().float().numpy()})[0]

    def predict(self, dm) -> torch.Tensor:
        """Logits over the test set (each batch through the data's evaluation transform)."""
        return torch.cat([torch.from_numpy(self(x)) for x in test_inputs(dm)])


def test_inputs(dm):
    """The test set's model inputs, batch by batch (the data's evaluation transform applied)."""
    for x, _, _ in dm.test_dataloader():
        yield dm.batch_transform(x, train=False)


def test_labels(dm) -> torch.Tensor:
    return torch.cat([y for _, y, _ in dm.test_dataloader()])


@torch.no_grad()
def predict_torch(model: nn.Module, dm) -> torch.Tensor:
    """Logits of a PyTorch model (a network, or a TappedModel/ensemble returning Outputs) over
    the test set, on the CPU in eval mode."""
    mode = model.training
    try:
        model.eval()
    except NotImplementedError:  # a torch.export program's module: already an inference graph
        mode = None
    try:
        outs = []
        for x in test_inputs(dm):
            out = model(x)
            outs.append((out.logits if hasattr(out, "logits") else out).float())
        return torch.cat(outs)
    finally:
        if mode is not None:
            model.train(mode)


def size_bytes(path: Path) -> int:
    """The file's size, with its external-data file if it has one."""
    extra = Path(str(path) + ".data")
    return os.path.getsize(path) + (os.path.getsize(extra) if extra.is_file() else 0)


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


class Reference:
    """The float student, the teacher and their test-set outputs, computed once per job."""

    def __init__(self, job) -> None:
        self.student = float_copy(job.student.model)
        self.teacher = job.teacher.cpu()
        self.input_shape = tuple(job.dm.input_shape)
        self.y = test_labels(job.dm)
        self.logits = predict_torch(self.student, job.dm)
        self.teacher_logits = predict_torch(self.teacher, job.dm) if job.teacher_trained else None
        self.params = count_parameters(self.student)

    @classmethod
    def of(cls, job) -> Reference:
        if "reference" not in job.cache:
            job.cache["reference"] = cls(job)
        return job.cache["reference"]


def fidelity(prefix: str, logits: torch.Tensor, ref: torch.Tensor, suffix: str = "") -> dict:
    """``max_abs_diff`` and top-1 ``agreement`` of ``logits`` against the PyTorch ``ref``."""
    return {
        f"{prefix}max_abs_diff{suffix}": float((logits - ref).abs().max()),
        f"{prefix}agreement{suffix}": agreement(logits, ref),
    }


def measure(form: str, path: Path, job, params: int | None = None) -> tuple[dict, torch.Tensor]:
    """Accuracy, ECE, agreement, size, latency, throughput and speed-ups of the deployed ONNX
    file ``path`` (metrics ``deploy/<form>/...``; see :mod:`kdbench.deploy`), and its test-set
    logits."""
    from kdbench.efficiency import latencies, throughput

    ref = Reference.of(job)
    eff = job.cfg.get("efficiency") or {}
    threads = torch.get_num_threads()
    batched = OrtModel(path, threads)
    logits = batched.predict(job.dm)
    p = f"deploy/{form}/"
    out = {
        f"{p}test/acc": accuracy(logits, ref.y),
        f"{p}test/ece": expected_calibration_error(logits, ref.y),
        f"{p}agreement": agreement(logits, ref.logits),
        f"{p}size_bytes": float(size_bytes(path)),
        f"{p}params": float(ref.params if params is None else params),
    }
    if ref.teacher_logits is not None:
        out[f"{p}test/agreement"] = agreement(logits, ref.teacher_logits)
    # batch 1, one thread each, in alternation with the PyTorch teacher and float student
    runs = int(eff.get("latency_runs", 30))
    single = OrtModel(path, 1)
    lat = latencies([single, ref.teacher, ref.student], ref.input_shape, "cpu", runs)
    out[f"{p}latency_ms"] = lat[0]
    out[f"{p}teacher_latency_ms"] = lat[1]
    out[f"{p}speedup"] = lat[1] / lat[0]
    out[f"{p}speedup_vs_float"] = lat[2] / lat[0]
    batch = int(eff.get("throughput_batch", 1024))
    out[f"{p}throughput"] = throughput(batched, ref.input_shape, "cpu", batch)
    return out, logits


def calibration_inputs(dm, samples: int, seed: int) -> np.ndarray:
    """``samples`` inputs drawn (with ``seed``) from the labelled training split, through the
    data's evaluation transform: never the validation or test samples."""
    n = len(dm.train_x)
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(n, generator=g)[: min(int(samples), n)].sort().values
    return dm.batch_transform(dm.train_x[idx], train=False).float().numpy()
