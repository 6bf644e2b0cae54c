"""Teachers: loaded from a checkpoint or trained once and cached, keyed by a hash of everything
that determines them (architecture, data, training recipe, seed); and the multi-teacher ensemble.

A teacher *spec* is the ``teacher`` config (or one of ``teacher.members`` for ``teacher=ensemble``,
with the recipe keys it leaves out taken from ``teacher``): ``arch``, ``kwargs``, ``taps``,
``checkpoint``, ``seed``, ``epochs``, ``batch_size``, ``optim``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdbench.cachefile import file_lock
from kdbench.errors import ConfigError, KdbenchError
from kdbench.metrics import ensemble_logits
from kdbench.models import model_id, model_name, source_digest, target_of
from kdbench.taps import Outputs

CACHE_VERSION = 3  # 2: epoch order a function of (seed, epoch); 3: fused optimizer kernels
RECIPE_KEYS = ("seed", "epochs", "batch_size", "optim")


def member_specs(cfg: DictConfig) -> list[DictConfig]:
    """The teacher specs of the run: one, or one per ensemble member."""
    t = cfg.teacher
    if t.arch != "ensemble":
        return [t]
    members = t.get("members") or []
    if len(members) < 2:
        raise ConfigError("teacher.members", len(members), "an ensemble needs at least 2 members")
    specs = []
    for m in members:
        spec = OmegaConf.create({k: t.get(k) for k in RECIPE_KEYS})
        spec.merge_with({"checkpoint": None, "kwargs": {}, "taps": {}})
        spec.merge_with(m)
        specs.append(spec)
    return specs


def _plain(node) -> dict:
    """A config node (possibly empty or None) as a plain dict."""
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node or {})


def teacher_key(spec: DictConfig, dm, precision: str) -> str:
    what = {
        "version": CACHE_VERSION,
        "arch": spec.get("arch"),
        "kwargs": _plain(spec.get("kwargs")),
        "data": dm.labelled_key(),  # a teacher trains on the labelled samples alone
        "batch_size": spec.batch_size,
        "epochs": spec.epochs,
        "optim": OmegaConf.to_container(spec.optim, resolve=True),
        "seed": spec.seed,
        "precision": precision,
    }
    if target_of(spec) is not None:  # a user's model: its class or factory, its module's source
        what.update(target=target_of(spec), source=source_digest(target_of(spec), "teacher"))
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def load_checkpoint(path: str | os.PathLike, model: nn.Module, arch: str) -> dict:
    """Load weights into ``model`` (``weights_only=True``: a checkpoint cannot run code)."""
    from kdbench.validate import check_teacher_checkpoint

    check_teacher_checkpoint(path)
    path = Path(os.path.expanduser(str(path)))
    try:
        # RepDistiller's *_last.pth also holds its argparse options (plain values, no code)
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the user's file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KdbenchError(
            f"teacher.checkpoint={str(path)!r} is not a readable weights-only PyTorch checkpoint "
            f"({first[:200]}): save it with torch.save(model.state_dict(), path)"
        ) from None
    # a plain state dict, kdbench's {'state_dict', 'meta'} or RepDistiller/mdistiller's
    # {'model', 'epoch', 'accuracy', ...}: kdbench/checkpoints.py maps the reference key names
    from kdbench.checkpoints import load_state, split_checkpoint

    what = f"teacher.checkpoint={str(path)!r}"
    state, meta = split_checkpoint(obj, what)
    load_state(model, state, arch, what)
    return meta


def save_checkpoint(
    path: Path, model: nn.Module, meta: dict, what: str = "trained teacher"
) -> bool:
    """Write atomically: a crash leaves the old file or none, never half of one. False (after a
    notice) where it cannot be written: the run goes on with the teacher in memory."""
    from kdbench.cachefile import atomic_write

    state = {"state_dict": model.state_dict(), "meta": meta}
    return atomic_write(path, lambda f: torch.save(state, f), what)


def alone_if_launched() -> dict:
    """Trainer options for a teacher trained in one process of a run whose processes were
    started outside Lightning (``torchrun``, ``srun``: each runs the whole command): that
    process trains it on one device, alone, under the cache lock, and the others load it once
    it is saved. A fit spanning the processes would wait forever for those waiting on the lock."""
    launched = (
        int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    )
    return {"devices": 1, "num_nodes": 1, "strategy": "auto"} if launched else {}


def train_teacher(cfg: DictConfig, spec: DictConfig, dm, model: nn.Module, root: Path) -> dict:
    """Train a teacher from scratch on the labelled data alone (CE), its own seed and recipe."""
    import lightning as L

    from kdbench.methods import Method
    from kdbench.schemes.offline import Offline
    from kdbench.taps import TappedModel

    start = time.perf_counter()
    use_transfer, dm.use_transfer = dm.use_transfer, False
    batch_size, dm.batch_size = dm.batch_size, spec.batch_size
    shuffle_seed, dm.shuffle_seed = dm.shuffle_seed, spec.seed
    try:
        with torch.random.fork_rng():
            L.seed_everything(spec.seed, workers=True, verbose=False)
            for m in model.modules():  # the same init as a fresh model under the teacher's seed
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            module = Offline(
                TappedModel(model, {}), None, Method("none", "none", 1, 0, 0, 1), spec.optim
            )
            result = fit_quietly(cfg, module, dm, root / "teacher", max_epochs=spec.epochs)
    finally:
        dm.use_transfer, dm.batch_size, dm.shuffle_seed = use_transfer, batch_size, shuffle_seed
    model.eval()
    return {**result, "train_seconds": time.perf_counter() - start}


def fit_quietly(cfg: DictConfig, module, dm, root: Path, **options) -> dict:
    """Fit and test ``module`` with no logger and no checkpoints (a teacher, a takd assistant:
    cached by the caller), in one process alone under srun/torchrun
    (:func:`alone_if_launched`): ``{"test_acc", "val_acc"}`` (the best validation accuracy,
    0 without validation)."""
    from kdbench.run import make_trainer

    trainer = make_trainer(
        cfg, root, logger=False, enable_checkpointing=False, **alone_if_launched(), **options
    )
    trainer.fit(module, datamodule=dm)
    val = trainer.callback_metrics.get("val/acc_best")
    trainer.test(module, datamodule=dm, verbose=False)
    return {
        "test_acc": float(trainer.callback_metrics["test/acc"]),
        "val_acc": float(val) if val is not None else 0.0,
    }


def _identity(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def resolve_one(cfg: DictConfig, spec: DictConfig, dm, model: nn.Module, root: Path) -> dict:
    """Fill ``model`` with the weights of the teacher ``spec``; return where they came from."""
    if spec.get("checkpoint"):
        meta = load_checkpoint(spec.checkpoint, model, model_id(spec))
        return {"source": "checkpoint", "path": str(spec.checkpoint), **meta}
    key = teacher_key(spec, dm, str(cfg.trainer.get("precision", "32")))
    path = (
        Path(os.path.expanduser(str(cfg.cache_dir)))
        / "teachers"
        / (f"{cfg.dataset.name}-{model_name(spec)}-{key}.pt")
    )
    return resolve_cached(
        path,
        model,
        model_id(spec),
        lambda: train_teacher(cfg, spec, dm, model, root),
        f"teacher {model_name(spec)}",
    )


def resolve_cached(path: Path, model: nn.Module, arch: str, train, what: str) -> dict:
    """Fill ``model`` from the cache entry ``path``, or train it (``train()`` returns its meta)
    and save it there; return where the weights came from. ``what`` names it in messages
    (``teacher cnn1d``, ``assistant 1 cnn1d``): a trained teacher, or anything cached like one
    (the assistants of ``scheme=takd``)."""
    kind = what.split()[0]

    def cached() -> dict | None:
        try:
            meta = load_checkpoint(path, model, arch)
        except KdbenchError as exc:
            print(f"kdbench: retraining the {kind} over an unusable cache entry ({exc})")
            return None
        return {"source": "cache", "path": str(path), **meta}

    if path.exists() and (info := cached()) is not None:
        return info
    # one process trains a teacher that several need at once; the others wait, then load it
    waiting = f"kdbench: waiting for another process training the same {kind} ({path})"
    seen = _identity(path)
    with file_lock(path, waiting):
        # written meanwhile by the process that held the lock
        if _identity(path) not in (None, seen) and (info := cached()) is not None:
            return info
        print(f"kdbench: training {what} (not cached yet; saved to {path})")
        meta = train()
        saved = save_checkpoint(path, model, meta, f"trained {kind}")
    return {"source": "trained", "path": str(path) if saved else None, **meta}


def resolve_teacher(cfg: DictConfig, dm, teacher, root: Path) -> dict:
    """Fill the run's teacher (a TappedModel or an EnsembleTeacher) with its weights."""
    models = teacher.members if isinstance(teacher, EnsembleTeacher) else [teacher]
    infos = [
        resolve_one(cfg, spec, dm, m.model, root)
        for spec, m in zip(member_specs(cfg), models, strict=True)
    ]
    if len(infos) == 1:
        return infos[0]
    sources = {i["source"] for i in infos}
    return {"source": sources.pop() if len(sources) == 1 else "mixed", "members": infos}


MEMBER_LOGITS = "ensemble_members"  # the feature holding every member's logits (B x K x C)


class EnsembleTeacher(nn.Module):
    """Several teachers as one: the response signal is the average of the members' softened
    probabilities at the method's temperature T (returned as logits ``T * log(mean_m softmax(
    z_m / T))``, whose softmax at T is exactly that average); features come from the member
    named by ``teacher.feature_member``.

    ``weighting`` (``teacher.weighting``) weighs the members per sample instead of equally
    (METHODS.md, multi-teacher: ``gamma CE + alpha sum_k w_k T^2 KL(p_k || q)``):

    - ``mean``: ``w_k = 1/K`` (the average above, unchanged);
    - ``entropy``: :func:`kdbench.losses.entropy_weights` (EBKD), the more certain member more;
    - ``ca_mkd``: :func:`kdbench.losses.ca_mkd_weights` (CA-MKD), the member whose prediction
      has the lower cross-entropy to the label more; unlabelled samples measure it against the
      ensemble's prediction.

    Weights sum to 1 per sample. For ``entropy`` and ``ca_mkd`` the forward pass also returns
    every member's logits (feature ``ensemble_members``: cached with the other teacher outputs)
    and :meth:`weigh` turns them, with the labels, into the weighted mixture
    :func:`kdbench.losses.weighted_mixture_logits`: KD to it has the gradient of the weighted
    sum of per-member KD terms, and every logit method (hard, dkd, dist, ...) sees one teacher
    distribution, as with ``mean``. Evaluation (``teacher/test/acc``, agreement) reports the
    members' average."""

    def __init__(
        self,
        members: list,
        temperature: float,
        feature_member: int | None,
        weighting: str = "mean",
    ) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.model = nn.ModuleList([m.model for m in members])  # the deployed networks
        self.temperature = float(temperature)
        self.feature_member = feature_member
        self.weighting = str(weighting)

    def forward(self, x: torch.Tensor, taps=frozenset()) -> Outputs:
        outs = [
            m(x, taps if i == self.feature_member else frozenset())
            for i, m in enumerate(self.members)
        ]
        t = self.temperature
        logits = t * ensemble_logits([o.logits / t for o in outs])
        features = outs[self.feature_member].features if self.feature_member is not None else {}
        if self.weighting != "mean":
            members = torch.stack([o.logits.float() for o in outs], 1)
            features = {**features, MEMBER_LOGITS: members}
        return Outputs(logits, features)

    def member_weights(self, member_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample weights (B x K) of ``teacher.weighting``."""
        from kdbench.losses import ca_mkd_weights, entropy_weights

        if self.weighting == "entropy":
            return entropy_weights(member_logits)
        if self.weighting == "ca_mkd":
            return ca_mkd_weights(member_logits, y)
        b, k = member_logits.shape[:2]
        return member_logits.new_full((b, k), 1.0 / k)

    def weigh(self, out: Outputs, y: torch.Tensor) -> tuple[Outputs, torch.Tensor | None]:
        """The teacher outputs ``out`` (of :meth:`forward`, or cached) with the response signal
        weighted per sample by ``teacher.weighting``, and the weights (B x K); ``mean``: ``out``
        itself and None."""
        from kdbench.losses import weighted_mixture_logits

        if self.weighting == "mean":
            return out, None
        members = out.features[MEMBER_LOGITS]
        w = self.member_weights(members, y)
        features = {k: v for k, v in out.features.items() if k != MEMBER_LOGITS}
        return Outputs(weighted_mixture_logits(members, w, self.temperature), features), w


def build_ensemble(cfg: DictConfig, dm, build_member) -> EnsembleTeacher:
    """``teacher=ensemble``: its members, each built by ``build_member(spec)``."""
    specs = member_specs(cfg)
    fm = cfg.teacher.get("feature_member")
    if fm is not None and (not isinstance(fm, int) or not 0 <= fm < len(specs)):
        raise ConfigError(
            "teacher.feature_member", fm, f"must be a member index 0..{len(specs) - 1}"
        )
    return EnsembleTeacher(
        [build_member(s) for s in specs],
        cfg.method.temperature,
        fm,
        cfg.teacher.get("weighting") or "mean",
    )


class TopKTeacher(nn.Module):
    """A black-box teacher that exposes only its top-K tokens per position, as an API does
    (``method.teacher_topk=K``): its logits are ``K + 1`` buckets at the method's temperature
    T (the top-K tokens, then one bucket for the missing mass; see
    :func:`kdbench.losses.topk_teacher_logits`) and ``features["topk_index"]`` holds the K
    token ids (int32), which the student's logits are bucketed by. The teacher-output cache
    stores exactly that: ``(K + 1) * 4 + K * 4`` bytes per token instead of ``V * 4``.
    ``full(x)`` is the whole teacher, for evaluation (agreement, the teacher's own metrics)."""

    def __init__(self, teacher: nn.Module, k: int, temperature: float) -> None:
        super().__init__()
        self.inner, self.topk, self.temperature = teacher, int(k), float(temperature)
        self.taps = getattr(teacher, "taps", {})

    def forward(self, x: torch.Tensor, taps=frozenset()) -> Outputs:
        from kdbench.losses import topk_teacher_logits

        out = self.inner(x, taps)
        buckets, index = topk_teacher_logits(out.logits, self.topk, self.temperature)
        return Outputs(buckets, {**out.features, "topk_index": index.to(torch.int32)})

    def full(self, x: torch.Tensor, taps=frozenset()) -> Outputs:
        return self.inner(x, taps)
