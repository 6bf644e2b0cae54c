"""Evaluation metrics on logits: accuracy, agreement with the teacher, calibration."""

from __future__ import annotations

import torch


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Fraction of samples where student and teacher predict the same class (top-1)."""
    return (student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean().item()


def expected_calibration_error(logits: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    """ECE: sum over equal-width confidence bins of |accuracy - confidence| * (bin size / N)."""
    probs = logits.float().softmax(1)
    conf, pred = probs.max(1)
    correct = (pred == y).float()
    edges = torch.linspace(0, 1, bins + 1, device=logits.device)
    ece = torch.zeros((), device=logits.device)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.float().mean() * (correct[in_bin].mean() - conf[in_bin].mean()).abs()
    return ece.item()


def ensemble_logits(logits: list[torch.Tensor]) -> torch.Tensor:
    """Log of the members' mean probability: its softmax is the average of their softmaxes."""
    probs = torch.stack([z.float().softmax(-1) for z in logits]).mean(0)
    return probs.clamp_min(1e-12).log()


def token_rows(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A language model's ``[N, L, V]`` logits and ``[N, L]`` labels as rows ``[M, V]``, ``[M]``
    of the M labelled tokens (padding and unlabelled positions, ``y < 0``, left out)."""
    keep = (y >= 0).flatten()
    return logits.flatten(0, 1)[keep], y.flatten()[keep]


def mean_nll(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats): ``-(1/N) sum_i log softmax(z_i)_{y_i}``."""
    return torch.nn.functional.cross_entropy(logits.float(), y).item()


def language_model_metrics(
    logits: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None = None
) -> dict[str, float]:
    """Per-token metrics of a language model over the labelled tokens: ``acc`` (top-1 next-token
    accuracy), ``ppl`` = exp(mean NLL), ``bpc`` = mean NLL / ln 2 (bits per character: every
    token of kdbench's text data sets is one character), ``ece`` (token-level calibration) and,
    with the teacher's logits, ``agreement`` (top-1 token agreement with the teacher)."""
    z, t = token_rows(logits, y)
    nll = mean_nll(z, t)
    out = {
        "acc": accuracy(z, t),
        "ppl": float(torch.tensor(nll).exp()),
        "bpc": nll / float(torch.log(torch.tensor(2.0))),
        "ece": expected_calibration_error(z, t),
    }
    if teacher is not None:
        out["agreement"] = agreement(z, token_rows(teacher, y)[0])
    return out
