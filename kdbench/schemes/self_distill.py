"""Self-distillation, born-again networks (Furlanello et al. 2018).

The student has the teacher's architecture. Generation 0 is the teacher trained on labels alone
(from ``teacher.checkpoint`` or the teacher cache); generation k is a fresh network distilled from
the frozen generation k-1 with the chosen method. ``scheme.generations`` counts all of them,
generation 0 included. Reported: each generation's test accuracy (``test/gen<k>/acc``), the
ensemble of all generations (``test/ensemble/acc``), and the last generation under the standard
names (``test/acc``, ``test/acc_best``, ...).
"""

from __future__ import annotations

import shutil

import torch

from kdbench.errors import ConfigError
from kdbench.metrics import ensemble_logits
from kdbench.schemes.base import token_accuracy as accuracy  # per token for LMs
from kdbench.schemes.offline import Offline, cache_options


@torch.no_grad()
def predict(model, dm) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of ``model`` (eval mode, on its own device) over ``dm``'s test set,
    each batch through the data module's evaluation transform."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, y, _ in dm.test_dataloader():
        logits.append(model(dm.batch_transform(x.to(device), train=False)).float().cpu())
        labels.append(y)
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


class BornAgain(Offline):
    """Generations are fits of one run: a resumed run skips the generations that finished (their
    last-epoch weights were saved and their finish recorded on the MLflow run) and continues the
    one it was in from that generation's last checkpoint."""

    student_role = "teacher"  # generation k has generation 0's architecture
    accepts_teacher_ensemble = False

    @classmethod
    def fit_names(cls, cfg) -> tuple[str, ...]:
        return tuple(f"gen{k}" for k in range(1, int(cfg.scheme.generations)))

    @classmethod
    def prepare(cls, ctx) -> None:
        gens = ctx.cfg.scheme.generations
        if not isinstance(gens, int) or gens < 2:
            raise ConfigError(
                "scheme.generations", gens, "must be an integer >= 2 (generation 0 is the teacher)"
            )
        super().prepare(ctx)

    @classmethod
    def execute(cls, ctx, runner) -> dict[str, float]:
        from kdbench.models import count_parameters
        from kdbench.progress import say
        from kdbench.run import attach_method, build_model

        cfg = ctx.cfg
        logits, y = predict(ctx.teacher.model, ctx.dm)
        all_logits = [logits]
        metrics: dict[str, float] = {"test/gen0/acc": accuracy(logits, y)}
        teacher, aux = ctx.teacher, 0
        last = cfg.scheme.generations - 1
        for k in range(1, last + 1):
            name = f"gen{k}"
            if k == 1:
                student, method = ctx.student, ctx.method
            else:  # a fresh network and fresh auxiliary modules for every generation, their
                # initialisation a function of (seed, k): the same whether or not earlier
                # generations ran in this process (resume)
                with torch.random.fork_rng():
                    torch.manual_seed(cfg.seed * 1000 + k)
                    student, method = build_model(cfg, "teacher", ctx.dm), ctx.method.copy()
                    attach_method(
                        method, student, teacher, cfg, ctx.dm, roles=("teacher", "teacher")
                    )
                aux += count_parameters(method)
            weights = runner.resume.done(name) if k < last else None
            if weights is not None:  # finished before the run was stopped
                say(f"generation {k}/{last}: finished earlier, its weights loaded from {weights}")
                student.model.load_state_dict(
                    torch.load(weights, map_location="cpu", weights_only=True)
                )
                shutil.copy(weights, runner.artifacts / f"{name}_student.pt")  # logged again
                acc_best = runner.resume.metrics[f"test/gen{k}/acc_best"]
            else:
                say(f"generation {k}/{last}: {cfg.method.name} from generation {k - 1}")
                module = cls(student, teacher, method, cfg.optim, **cache_options(cfg))
                gen_metrics = runner.fit_and_test(module, student.model, name=name)
                acc_best = gen_metrics["test/acc_best"]
            logits, _ = predict(student.model, ctx.dm)  # the weights of the last epoch
            all_logits.append(logits)
            metrics[f"test/gen{k}/acc"] = accuracy(logits, y)
            metrics[f"test/gen{k}/acc_best"] = acc_best
            if weights is None and k < last:
                runner.done(
                    name, {m: v for m, v in metrics.items() if m.startswith(f"test/{name}/")}
                )
            teacher = student  # frozen by the next generation's module
            ctx.student = student
        metrics.update(gen_metrics)  # the last generation under the standard names
        metrics["test/ensemble/acc"] = accuracy(ensemble_logits(all_logits), y)
        metrics["teacher/test/acc"] = metrics["test/gen0/acc"]
        ctx.info["aux_params"] = aux
        return metrics
