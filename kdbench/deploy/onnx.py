"""``deploy=onnx``: the student as ONNX and torch.export files, checked against PyTorch and timed
with ONNX Runtime.

Artifacts: ``student.onnx`` (last epoch), ``student_best.onnx`` (best validation epoch, where the
run has one) and ``student.pt2`` (``torch.export``; the dynamo exporter's input). Metrics, with
the ONNX model run by ONNX Runtime on the CPU over the whole test set:
``deploy/onnx/max_abs_diff`` and ``deploy/onnx/agreement`` (largest absolute logit difference
and top-1 agreement with the PyTorch student; ``..._best`` for the best epoch),
``deploy/pt2/max_abs_diff`` (the torch.export program against PyTorch), and the measurements of
:func:`kdbench.deploy.runtime.measure` (``test/acc``, ``latency_ms``, ``throughput``,
``size_bytes``, ``speedup``, ...).
"""

from __future__ import annotations

from kdbench.deploy import Form, Job


class OnnxForm(Form):
    name = "onnx"

    def export_float(self, job: Job) -> dict[str, float]:
        """Export the last and best student, check and measure them (``deploy/onnx/...``)."""
        import torch

        from kdbench.deploy import runtime

        ref = runtime.Reference.of(job)
        d, shape = self.d, ref.input_shape
        exporter, opset = str(d.get("exporter", "dynamo")), d.get("opset")
        path = job.out_dir / "student.onnx"
        ep = runtime.export_onnx(runtime.float_copy(ref.student), shape, path, exporter, opset)
        metrics, logits = runtime.measure("onnx", path, job)
        metrics.update(runtime.fidelity("deploy/onnx/", logits, ref.logits))
        if ep is not None:
            torch.export.save(ep, job.out_dir / "student.pt2")
            program = torch.export.load(job.out_dir / "student.pt2").module()
            pt2 = runtime.predict_torch(program, job.dm)
            metrics["deploy/pt2/max_abs_diff"] = float((pt2 - ref.logits).abs().max())
        if job.best_state is not None:
            best = runtime.float_copy(ref.student)
            best.load_state_dict(job.best_state)
            best_path = job.out_dir / "student_best.onnx"
            runtime.export_onnx(best, shape, best_path, exporter, opset)
            best_logits = runtime.OrtModel(best_path, torch.get_num_threads()).predict(job.dm)
            metrics.update(
                runtime.fidelity(
                    "deploy/onnx/", best_logits, runtime.predict_torch(best, job.dm), "_best"
                )
            )
            from kdbench.metrics import accuracy

            metrics["deploy/onnx/test/acc_best"] = accuracy(best_logits, ref.y)
        job.record("onnx", d, OnnxForm.options)
        job.cache["onnx"] = path
        return metrics

    def deploy(self, job: Job) -> dict[str, float]:
        return self.export_float(job)
