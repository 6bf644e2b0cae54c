"""Teacher-assistant knowledge distillation (TAKD, Mirzadeh et al. 2020, "Improved Knowledge
Distillation via Teacher Assistant").

A chain teacher -> assistant 1 -> ... -> assistant K -> student, ``scheme.assistants`` listing the
assistants' networks (model specs like the student config: ``name``, ``arch`` or ``_target_``,
``kwargs``, ``taps``). Each link is offline distillation with the run's method, its teacher
frozen in eval mode (METHODS.md, "Variants of schemes and teachers"); the teacher itself is
resolved as for ``scheme=offline`` (checkpoint or trained once and cached).

Each assistant is trained with the run's method, optimiser, trainer and data, under its own seed
(``scheme.assistant_seed``: fixed across the student's seeds as ``teacher.seed`` is; null: the
run's seed), and cached like a trained teacher under ``cache_dir/assistants``, keyed by a digest
of its own teacher's weights (so of that teacher's key, and of every assistant before it), its
network, the method, optimiser, trainer, data and seed: a later run with the same chain loads it
(tag ``assistant<k>_source``: ``trained`` or ``cache``). Resume: the student's fit continues from
its checkpoint; assistants finished before the stop come from the cache.

Logged: ``assistant<k>/test/acc`` and ``assistant<k>/params`` for every assistant; the student
under the standard names; ``teacher/test/acc`` and ``test/agreement`` against the real teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from kdbench.errors import ConfigError
from kdbench.schemes.offline import Offline, cache_options

VERSION = 1  # of the assistant cache key below
DISPLAY_KEYS = ("enable_progress_bar", "enable_model_summary", "log_every_n_steps")


def _plain(node) -> object:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def assistant_specs(cfg: DictConfig) -> list[DictConfig]:
    """``scheme.assistants``, every spec checked as a student config is (one-line errors)."""
    from kdbench.modelspec import ALLOWED_KEYS, _check_keys, _check_network

    specs = cfg.scheme.get("assistants")
    if not isinstance(specs, ListConfig) or len(specs) == 0:
        raise ConfigError(
            "scheme.assistants",
            _plain(specs),
            "must be a non-empty list of networks, e.g. "
            "[{arch: cnn1d, kwargs: {channels: [32, 32, 64, 64]}}]",
        )
    for i, spec in enumerate(specs):
        where = f"scheme.assistants[{i}]"
        if not isinstance(spec, DictConfig):
            raise ConfigError(where, spec, "must be a network spec: {arch: ..., kwargs: {...}}")
        _check_keys(spec, where, ALLOWED_KEYS["student"])
        _check_network(spec, where, None)
    return list(specs)


def assistant_seed(cfg: DictConfig) -> int:
    seed = cfg.scheme.get("assistant_seed", 0)
    if seed is None:
        return int(cfg.seed)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(
            "scheme.assistant_seed", seed, "must be an integer >= 0, or null for the run's seed"
        )
    return seed


def assistant_key(cfg: DictConfig, dm, spec, assistant, upstream, seed: int) -> str:
    """What determines a trained assistant: its teacher's weights (a digest: the teacher's own
    key and every link before it) and taps, its network, the method, optimiser, trainer (but
    display options), data and seed."""
    from kdbench.models import source_digest, target_of
    from kdbench.teacher import CACHE_VERSION
    from kdbench.teacher_outputs import weights_digest

    trainer = {k: v for k, v in _plain(cfg.trainer).items() if k not in DISPLAY_KEYS}
    dataset = {k: v for k, v in _plain(cfg.dataset).items() if k not in ("data_dir", "root")}
    what = {
        "version": [CACHE_VERSION, VERSION],
        "upstream": weights_digest(upstream),
        "upstream_taps": upstream.taps,
        "spec": _plain(spec),
        "taps": assistant.taps,
        "method": _plain(cfg.method),
        "optim": _plain(cfg.optim),
        "trainer": trainer,
        "data": dm.cache_key(),
        "dataset": dataset,
        "seed": seed,
    }
    if target_of(spec) is not None:  # a user's model: its module's source too
        what["source"] = source_digest(target_of(spec), "scheme.assistants")
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_link(cfg, dm, k: int, spec, assistant, upstream, root: Path, seed: int) -> dict:
    """Offline distillation of ``assistant`` from the frozen ``upstream`` with the run's method,
    as a fresh network under ``seed`` (its weights and the method's modules), the run's
    optimiser, trainer and data; nothing logged (it is cached like a trained teacher)."""
    import lightning as L

    from kdbench.methods import Term, build_method
    from kdbench.run import attach_method, build_network
    from kdbench.teacher import fit_quietly

    start = time.perf_counter()
    where = f"scheme.assistants[{k - 1}]"
    shuffle_seed, dm.shuffle_seed = dm.shuffle_seed, seed
    try:
        with torch.random.fork_rng():
            L.seed_everything(seed, workers=True, verbose=False)
            assistant.model.load_state_dict(build_network(spec, dm, where).model.state_dict())
            method = build_method(cfg.method)
            up = "teacher" if k == 1 else f"scheme.assistants[{k - 2}]"
            attach_method(method, assistant, upstream, cfg, dm, roles=(where, up))
            module = Offline(assistant, upstream, method, cfg.optim, **cache_options(cfg))
            module.tag_prefix = f"assistant{k}_"  # progress: "fitting the teacher (assistant1)"
            for term in module.modules():
                if isinstance(term, Term):
                    term.bind_data(dm)
            result = fit_quietly(cfg, module, dm, root / f"assistant{k}")
    finally:
        dm.shuffle_seed = shuffle_seed
    assistant.eval()
    return {**result, "train_seconds": time.perf_counter() - start}


class TAKD(Offline):
    """The last link (last assistant -> student) is this module: :class:`Offline` whose
    evaluation leaves the assistant out (``teacher/test/acc`` and ``test/agreement`` are the
    real teacher's, measured after the fit)."""

    supports_language_models = False  # not built for logits [B, L, V] yet

    accepts_teacher_ensemble = False

    @classmethod
    def prepare(cls, ctx) -> None:
        """The assistants built and every link's method attached (shape-checked) on a dummy
        batch: teacher -> assistant 1 -> ... -> student, before any data or training."""
        from kdbench.methods import build_method
        from kdbench.run import attach_method, build_network

        cfg = ctx.cfg
        specs = assistant_specs(cfg)
        assistant_seed(cfg)
        if getattr(ctx.method, "teacher_free", False):
            raise ConfigError(
                "method",
                cfg.method.name,
                f"scheme=takd passes a teacher's knowledge down a chain, and method="
                f"{cfg.method.name} learns from a target of its own, not from a network: pick a "
                "method that learns from a teacher (kd, dkd, fitnet, ...)",
            )
        names = [f"scheme.assistants[{i}]" for i in range(len(specs))]
        assistants = [build_network(s, ctx.dm, n) for s, n in zip(specs, names, strict=True)]
        chain, roles = [ctx.teacher, *assistants], ["teacher", *names]
        for k, assistant in enumerate(assistants):
            attach_method(
                build_method(cfg.method), assistant, chain[k], cfg, ctx.dm, (roles[k + 1], roles[k])
            )
        attach_method(
            ctx.method, ctx.student, assistants[-1], cfg, ctx.dm, roles=("student", names[-1])
        )
        ctx.info["assistants"] = assistants

    @classmethod
    def from_context(cls, ctx) -> TAKD:
        upstream = ctx.info["assistants"][-1]
        return cls(ctx.student, upstream, ctx.method, ctx.cfg.optim, **cache_options(ctx.cfg))

    @classmethod
    def execute(cls, ctx, runner) -> dict[str, float]:
        from kdbench.metrics import accuracy, agreement
        from kdbench.models import count_parameters, model_id, model_name
        from kdbench.progress import say
        from kdbench.schemes.self_distill import predict
        from kdbench.teacher import resolve_cached

        cfg, dm = ctx.cfg, ctx.dm
        specs, seed = assistant_specs(cfg), assistant_seed(cfg)
        assistants = ctx.info["assistants"]
        cache = Path(os.path.expanduser(str(cfg.cache_dir))) / "assistants"
        metrics: dict[str, float] = {}
        upstream = ctx.teacher
        for k, (spec, assistant) in enumerate(zip(specs, assistants, strict=True), start=1):
            name = model_name(spec)
            key = assistant_key(cfg, dm, spec, assistant, upstream, seed)
            path = cache / f"{cfg.dataset.name}-{name}-{key}.pt"
            info = resolve_cached(
                path,
                assistant.model,
                model_id(spec),
                lambda k=k, spec=spec, a=assistant, up=upstream: train_link(
                    cfg, dm, k, spec, a, up, runner.root, seed
                ),
                f"assistant {k} {name}",
            )
            assistant.eval()
            logits, y = predict(assistant.model, dm)
            metrics[f"assistant{k}/test/acc"] = accuracy(logits, y)
            metrics[f"assistant{k}/params"] = count_parameters(assistant.model)
            say(
                f"assistant {k}/{len(specs)} {name}: {info['source']}, "
                f"test acc {metrics[f'assistant{k}/test/acc']:.4f}"
            )
            if runner.logger:
                runner.logger.experiment.set_tag(
                    runner.logger.run_id, f"assistant{k}_source", info["source"]
                )
            upstream = assistant
        say(f"student: {cfg.method.name} from assistant {len(specs)}")
        metrics.update(runner.fit_and_test(cls.from_context(ctx), ctx.student.model))
        t_logits, y = predict(ctx.teacher.model, dm)
        s_logits, _ = predict(ctx.student.model, dm)  # the last epoch's weights
        metrics["teacher/test/acc"] = accuracy(t_logits, y)
        metrics["test/agreement"] = agreement(s_logits, t_logits)
        return metrics

    def evaluate(self, x):
        return {"student": self.student(x).logits}
