"""Sequence-level knowledge distillation (Kim & Rush 2016): the student trains on the teacher's
generated outputs instead of (or beside) the data's.

Before the fit, the frozen teacher generates a continuation for every training prompt: on a
data set of problems (``dm.prompts``: arithmetic) its worked answer to each training problem
(and to each transfer problem, ``dataset.transfer_size``), greedy as in the paper's beam-1
setting; on running text (shakespeare_char) the continuation of the first
``scheme.prompt_len`` characters of each training window, sampled at
``scheme.temperature`` (greedy character-level decoding loops). The student then trains, as
in offline distillation, on these sequences: the hard-label term (``method.gamma``) is the
cross-entropy on the teacher's tokens (Seq-KD) and the method's distillation terms
(``method.alpha``/``beta``) are applied teacher-forced on the same sequences (Seq-KD +
Word-KD, the paper's best combination). Only the generated positions are learned (the
prompt's labels are PAD_LABEL), so a student sees what the teacher said, not the data.

The generated set is cached under ``<cache_dir>/generated`` keyed by the teacher's weights, the
prompts and the generation settings: other seeds, methods and students reuse it. Validation
and test stay on the data's own held-out sequences.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch

from kdbench.errors import ConfigError, KdbenchError
from kdbench.schemes.offline import Offline


def require_language_model(ctx, scheme: str) -> None:
    """A scheme that generates text needs a language-model data set and teacher."""
    if getattr(ctx.dm, "task", "classify") != "lm":
        raise ConfigError(
            "scheme",
            scheme,
            f"scheme={scheme} generates sequences: it needs a language-model data set "
            "(experiment=shakespeare_char or experiment=arithmetic)",
        )


def prompt_length(cfg, dm) -> int:
    """The prompt's tokens: the data set's fixed prompt (arithmetic), else
    ``scheme.prompt_len`` of each window (at least 1, less than the window)."""
    if hasattr(dm, "prompt_len"):
        return int(dm.prompt_len)
    p = cfg.scheme.get("prompt_len", 32)
    context = int(dm.input_shape[0])
    if not isinstance(p, int) or isinstance(p, bool) or not 1 <= p < context:
        raise ConfigError("scheme.prompt_len", p, f"must be an integer in [1, {context - 1}]")
    return p


def training_prompts(dm, p: int) -> torch.Tensor:
    """The prompts of the training sequences (and of the transfer set where the data set has
    one): the data set's own (``dm.prompts``) or each window's first ``p`` tokens."""
    if hasattr(dm, "prompts"):
        parts = [dm.prompts("train")]
        if dm.transfer_size > 0:
            parts.append(dm.prompts("transfer"))
        return torch.cat(parts)
    x = dm.train_x
    if dm.transfer_size > 0 and len(dm.transfer_x):
        x = torch.cat([x, dm.transfer_x])
    return dm.batch_transform(x[:, :p], train=False)


def as_training_pairs(seqs: torch.Tensor, p: int, eos: int | None) -> tuple[torch.Tensor, ...]:
    """``(x, y)`` of generated sequences ``[N, p + new]``: ``x = seq[:-1]``, ``y = seq[1:]``
    with PAD_LABEL on the prompt's positions and after the end token (padding id 0 there)."""
    from kdbench.data.base import PAD_LABEL

    x, y = seqs[:, :-1].clone(), seqs[:, 1:].clone()
    y[:, : p - 1] = PAD_LABEL
    if eos is not None:  # positions after the first end token are padding
        is_eos = (seqs[:, p:] == eos).long()
        after = (is_eos.cumsum(1) - is_eos) > 0  # strictly after the first eos
        y[:, p - 1 :][after] = PAD_LABEL
    return x, y


def generation_settings(cfg, dm) -> dict:
    greedy = hasattr(dm, "final_answer") or cfg.scheme.get("greedy", False)
    return {
        "greedy": bool(greedy),
        "temperature": float(cfg.scheme.get("temperature", 1.0)),
        "seed": int(cfg.scheme.get("generation_seed", 0)),
    }


@torch.no_grad()
def teacher_sequences(teacher, dm, cfg, cache_dir: str | None) -> tuple[torch.Tensor, str]:
    """The teacher's continuation of every training prompt, ``[N, S]`` token ids (prompt
    included), from the cache or generated now: ``(sequences, "cached" | "generated")``."""
    from kdbench.cachefile import atomic_write, read_or_none
    from kdbench.generate import generate
    from kdbench.progress import say
    from kdbench.teacher_outputs import weights_digest

    p = prompt_length(cfg, dm)
    prompts = training_prompts(dm, p)
    total = int(dm.input_shape[0]) + 1  # x and y are one window of context + 1 tokens
    new = total - p
    settings = generation_settings(cfg, dm)
    eos = getattr(dm, "eos_id", None)
    device = next(teacher.parameters()).device
    batch = int(cfg.scheme.get("generation_batch", 256))
    key = {  # the samples depend on the batching and the device's random stream too
        "teacher": weights_digest(teacher),
        "prompts": hashlib.sha256(prompts.numpy().tobytes()).hexdigest(),
        "new": new,
        "eos": eos,
        "batch": batch,
        "device": device.type,
        **settings,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = None
    if cache_dir:
        path = Path(os.path.expanduser(str(cache_dir))) / f"{dm.name}-seqkd-{digest}.pt"

        def read(f: Path) -> torch.Tensor:
            seqs = torch.load(f, map_location="cpu", weights_only=True)
            if tuple(seqs.shape) != (len(prompts), total):
                raise ValueError(f"shape {tuple(seqs.shape)}")
            return seqs

        seqs = read_or_none(path, read, "generated-sequence cache entry")
        if seqs is not None:
            return seqs, "cached"
    g = torch.Generator(device=device).manual_seed(settings["seed"])
    say(f"seqkd: the teacher generates {len(prompts)} continuations of {new} tokens")
    parts = []
    for i in range(0, len(prompts), batch):
        parts.append(
            generate(
                teacher,
                prompts[i : i + batch].to(device),
                new,
                temperature=settings["temperature"],
                greedy=settings["greedy"],
                eos=eos,
                generator=g,
            ).cpu()
        )
    seqs = torch.cat(parts)
    if path is not None:
        atomic_write(path, lambda f: torch.save(seqs, f), "generated sequences")
    return seqs, "generated"


def generated_view(dm, x: torch.Tensor, y: torch.Tensor, digest: str):
    """A shallow copy of the data module that trains on ``(x, y)`` (stored as the data set
    stores tokens) and keeps the validation and test sets; its cache key names the generated
    set, so teacher outputs cached for it are never mixed up with the data's."""
    view = copy.copy(dm)
    view.train_x, view.train_y = x.to(dm.storage_dtype), y
    view.transfer_x = x[:0].to(dm.storage_dtype)
    view.use_transfer = False
    base_key = dm.cache_key()
    view.cache_key = lambda: {**base_key, "seqkd": digest}
    return view


class SeqKD(Offline):
    """Offline distillation on the teacher's generated sequences (see the module docstring)."""

    supports_resume = True

    @classmethod
    def prepare(cls, ctx) -> None:
        require_language_model(ctx, "seqkd")
        prompt_length(ctx.cfg, ctx.dm)  # a bad scheme.prompt_len fails now
        super().prepare(ctx)
        if ctx.info.get("teacher_free"):
            raise ConfigError(
                "method", ctx.cfg.method.name, "scheme=seqkd needs a teacher to generate from"
            )

    @classmethod
    def execute(cls, ctx, runner) -> dict[str, float]:
        from kdbench.progress import say

        dm = ctx.dm
        teacher = ctx.teacher
        if teacher is None:
            raise KdbenchError("scheme=seqkd needs a teacher")
        teacher.eval()
        cache = ctx.cfg.teacher_output_cache
        where = f"{ctx.cfg.cache_dir}/generated" if cache.get("persist", True) else None
        seqs, source = teacher_sequences(teacher, dm, ctx.cfg, where)
        say(f"seqkd: teacher continuations {source}")
        p = prompt_length(ctx.cfg, dm)
        x, y = as_training_pairs(seqs, p, getattr(dm, "eos_id", None))
        digest = hashlib.sha256(seqs.numpy().tobytes()).hexdigest()[:16]
        view = generated_view(dm, x, y, digest)
        module = cls.from_context(ctx)
        if runner.logger:
            runner.logger.experiment.set_tag(runner.logger.run_id, "seqkd_sequences", source)
        metrics = runner.fit_and_test(module, ctx.student.model, datamodule=view)
        metrics["seqkd/sequences"] = float(len(seqs))
        return metrics
