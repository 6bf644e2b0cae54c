"""Data-free distillation: DAFL (Chen et al. 2019, "Data-Free Learning of Student Networks",
ICCV) with DeepInversion's BatchNorm-statistics prior (Yin et al. 2020, "Dreaming to Distill",
CVPR).

A generator G maps noise z ~ N(0, I) to inputs of the data set's shape. Each step (``scheme.
steps_per_epoch`` per epoch, ``scheme.batch_size`` samples each) G and the student update
together from one backward, as DAFL's reference code (``DAFL-train.py``) does:

- G minimises, through the frozen teacher T (eval mode for the whole run, its BatchNorm
  statistics never move), with x = G(z), z_T = T(x), f_T = T's penultimate features
  (the ``embedding`` tap):

      one_hot * CE(z_T, argmax z_T)                  (confident teacher)
    - activation * mean |f_T|                        (strong features)
    + entropy * sum_c pbar_c log10 pbar_c            (pbar = mean over the batch of softmax z_T:
                                                      balanced classes; log10 as the reference)
    + bn_weight * sum_l ||mu_l(x) - BN_l.running_mean||_2 + ||sigma_l^2(x) - BN_l.running_var||_2
                                                     (DeepInversion, over T's BatchNorm layers)

  logged as ``train/gen/one_hot``, ``train/gen/activation``, ``train/gen/entropy``,
  ``train/gen/bn`` (each weighted); the functions are in :mod:`kdbench.losses`.
- the student learns by the run's method (its distillation terms: ``alpha * KD + beta * term``)
  on x detached, towards T's detached outputs; generated samples carry no labels, so there is no
  CE term (gamma plays no part). DAFL's own student loss, ``KL(softmax z_T || softmax z_S)``
  averaged over the batch, is ``method=kd method.temperature=1 method.alpha=1`` exactly.

The real data serves only for evaluation (validation and test): the fit reads a
:class:`GeneratedData` module, whose training batches are latent vectors (a function of the
seed, the epoch and the step: a resumed fit sees the same ones) and whose validation and test
sets are the run's. G (and its optimizer, ``scheme.generator_optim``) is auxiliary: counted in
``aux/params``, saved as the artifact ``generator.pt``.

``datafree/recovered = (test/acc - none_acc) / (kd_acc - none_acc)``: the share of the gain of KD
on the real transfer set that data-free distillation recovers, logged when
``scheme.reference.none_acc`` and ``kd_acc`` (the student alone and kd, from runs on real data)
are given; the results script computes it from its own none and kd rows otherwise.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from kdbench.errors import ConfigError, KdbenchError
from kdbench.methods import Method, Term
from kdbench.schemes.base import own_optimizer
from kdbench.schemes.offline import Offline
from kdbench.taps import TappedModel


class Generator(nn.Module):
    """DAFL's generator (the reference's ``Generator``, a DCGAN-style one) for inputs of shape
    ``(C, L)`` (1-D) or ``(C, H, W)`` (2-D): linear z -> 128 maps at a quarter of the size,
    BatchNorm, upsample to half the size, conv 3 128->128, BatchNorm (eps 0.8, as the
    reference), LeakyReLU 0.2, upsample to the full size, conv 3 128->64, BatchNorm (eps 0.8),
    LeakyReLU 0.2, conv 3 64->C, tanh, BatchNorm without affine parameters (outputs standardised
    per channel, like normalised model inputs). Sizes not divisible by 4 are rounded up and
    interpolated to the exact size."""

    def __init__(self, latent_dim: int, input_shape: tuple[int, ...], width: int = 128) -> None:
        super().__init__()
        channels, *size = (int(v) for v in input_shape)
        if len(size) not in (1, 2):
            raise KdbenchError(
                f"scheme=datafree generates 1-D (channels, length) or 2-D (channels, height, "
                f"width) inputs; this data set's input shape is {tuple(input_shape)}"
            )
        conv = nn.Conv1d if len(size) == 1 else nn.Conv2d
        bn = nn.BatchNorm1d if len(size) == 1 else nn.BatchNorm2d
        self.size = tuple(size)
        self.half = tuple(math.ceil(s / 2) for s in size)
        self.init = tuple(math.ceil(s / 4) for s in size)
        self.width = width
        self.l1 = nn.Linear(latent_dim, width * math.prod(self.init))
        self.bn0 = bn(width)
        self.block1 = nn.Sequential(
            conv(width, width, 3, stride=1, padding=1), bn(width, 0.8), nn.LeakyReLU(0.2)
        )
        self.block2 = nn.Sequential(
            conv(width, width // 2, 3, stride=1, padding=1),
            bn(width // 2, 0.8),
            nn.LeakyReLU(0.2),
            conv(width // 2, channels, 3, stride=1, padding=1),
            nn.Tanh(),
            bn(channels, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.l1(z).reshape(z.shape[0], self.width, *self.init)
        x = F.interpolate(self.bn0(x), size=self.half)  # nearest, as scale_factor=2 there
        x = F.interpolate(self.block1(x), size=self.size)
        return self.block2(x)


class _Latents(Dataset):
    """``steps`` batches of latent vectors per epoch, batch k of epoch e a function of
    (seed, e, k) alone; labels -1 (none), indices for the bookkeeping."""

    def __init__(self, steps: int, batch: int, dim: int, seed: int, epoch) -> None:
        self.steps, self.batch, self.dim, self.seed, self.epoch = steps, batch, dim, seed, epoch

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, k: int):
        key = ((self.seed * 1_000_003 + self.epoch()) * 1_000_003 + int(k)) % (2**63)
        z = torch.randn(self.batch, self.dim, generator=torch.Generator().manual_seed(key))
        y = torch.full((self.batch,), -1, dtype=torch.long)
        return z, y, torch.arange(k * self.batch, (k + 1) * self.batch)


class GeneratedData(L.LightningDataModule):
    """Training batches of latent vectors (no real sample), validation and test from the run's
    data module ``real`` (its evaluation transform applied)."""

    def __init__(self, real, steps: int, batch_size: int, latent_dim: int, seed: int) -> None:
        super().__init__()
        self.real = real
        self.steps, self.batch_size, self.latent_dim, self.seed = (
            steps,
            batch_size,
            latent_dim,
            seed,
        )
        self.steps_per_call = 1
        self.augment = False
        self.num_classes = real.num_classes
        self.input_shape = real.input_shape

    def _epoch(self) -> int:
        return int(self.trainer.current_epoch) if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        ds = _Latents(self.steps, self.batch_size, self.latent_dim, self.seed, self._epoch)
        return DataLoader(ds, batch_size=None, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self.real.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.real.test_dataloader()

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training:
            return batch  # latent vectors: no transform
        return self.real.on_after_batch_transfer(batch, dataloader_idx)  # real: eval view


class _BNStatistics:
    """Forward hook on one of the teacher's BatchNorm layers: while ``sink`` is collecting (a
    list in ``sink[0]``), appends DeepInversion's statistics loss of the layer's input."""

    def __init__(self, sink: list) -> None:
        self.sink = sink

    def __call__(self, module, inputs, output) -> None:
        from kdbench.losses import bn_statistics_loss

        if self.sink[0] is not None:
            self.sink[0].append(
                bn_statistics_loss(inputs[0], module.running_mean, module.running_var)
            )


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]


class DataFree(Offline):
    """See the module docstring. The teacher is frozen as in :class:`Offline` (no teacher-output
    cache: every generated batch is new)."""

    accepts_teacher_ensemble = False
    supports_language_models = False  # generates float inputs, not token ids
    supports_resume = True  # G, both optimizers and the step's latents come back (see _Latents)

    def __init__(
        self,
        student: TappedModel,
        teacher: TappedModel,
        method: Method,
        optim_cfg,
        generator: Generator,
        generator_optim,
        latent_dim: int = 100,
        one_hot: float = 1.0,
        activation: float = 0.1,
        entropy: float = 5.0,
        bn_weight: float = 1.0,
    ) -> None:
        super().__init__(student, teacher, method, optim_cfg, cache_teacher_outputs=False)
        self.generator = own_optimizer(generator, generator_optim)
        self.latent_dim = latent_dim
        self.one_hot, self.activation, self.entropy = one_hot, activation, entropy
        self.bn_weight = bn_weight
        self.gen_taps = method.taps | ({"embedding"} if activation > 0 else set())
        self._bn_sink: list = [None]
        self.bn_layers = _batchnorms(teacher) if bn_weight > 0 else []
        for m in self.bn_layers:
            m.register_forward_hook(_BNStatistics(self._bn_sink))

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def prepare(cls, ctx) -> None:
        """Refuse what cannot learn from generated samples, build G (shape checked), attach the
        method (a forward of both untrained models on a dummy batch), before any work."""
        cfg, method = ctx.cfg, ctx.method
        name = cfg.method.name
        term = method.term if method.beta > 0 else None
        if not method.uses_teacher:  # (none is refused already by the config checks)
            raise ConfigError(
                "method",
                name,
                "scheme=datafree trains on generated samples, which have no labels, and this "
                "method reads no teacher output: pick one that learns from the teacher "
                "(e.g. method=kd)",
            )
        if term is not None and type(term).bind_data is not Term.bind_data:
            raise ConfigError(
                "method",
                name,
                "this method's term is bound to the real training set (memory banks or sample "
                "indices): scheme=datafree has none; pick a method without (e.g. method=kd)",
            )
        s = cfg.scheme
        if float(s.activation) > 0 and not ctx.teacher.taps.get("embedding"):
            raise ConfigError(
                "scheme.activation",
                s.activation,
                "DAFL's activation term needs the teacher's penultimate features: set "
                "teacher.taps.embedding to a module path, or scheme.activation=0",
            )
        ctx.info["generator"] = Generator(
            int(s.latent_dim), tuple(ctx.dm.input_shape), int(s.get("generator_width", 128))
        )
        super().prepare(ctx)

    @classmethod
    def from_context(cls, ctx) -> DataFree:
        from omegaconf import OmegaConf

        s = ctx.cfg.scheme
        return cls(
            ctx.student,
            ctx.teacher,
            ctx.method,
            ctx.cfg.optim,
            ctx.info["generator"],
            OmegaConf.to_container(s.generator_optim, resolve=True),
            latent_dim=int(s.latent_dim),
            one_hot=float(s.one_hot),
            activation=float(s.activation),
            entropy=float(s.entropy),
            bn_weight=float(s.bn_weight),
        )

    @classmethod
    def execute(cls, ctx, runner) -> dict[str, float]:
        from kdbench.models import count_parameters

        cfg, s = ctx.cfg, ctx.cfg.scheme
        module = cls.from_context(ctx)
        batch = int(s.batch_size) if s.get("batch_size") is not None else ctx.dm.batch_size
        data = GeneratedData(ctx.dm, int(s.steps_per_epoch), batch, int(s.latent_dim), cfg.seed)
        metrics = runner.fit_and_test(module, ctx.student.model, datamodule=data)
        torch.save(module.generator.state_dict(), runner.artifacts / "generator.pt")
        ctx.info["aux_params"] = ctx.info.get("aux_params", 0) + count_parameters(module.generator)
        ref = s.get("reference") or {}
        if ref.get("none_acc") is not None and ref.get("kd_acc") is not None:
            none, kd = float(ref.none_acc), float(ref.kd_acc)
            for suffix in ("", "_best"):
                acc = metrics.get(f"test/acc{suffix}")
                if acc is not None and kd != none:
                    metrics[f"datafree/recovered{suffix}"] = (acc - none) / (kd - none)
        return metrics

    # -- fit ------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """No teacher-output cache (new samples every step); say where the inputs come from."""
        self._teacher_cache = None
        self.record_tag("training_data", "generated (scheme=datafree: no real training sample)")
        layers = len(self.bn_layers)
        if self.bn_weight > 0:
            bn = f"on ({layers} BatchNorm layers)" if layers else "off (teacher has no BatchNorm)"
        else:
            bn = "off (scheme.bn_weight=0)"
        self.record_tag("datafree_bn_prior", bn)

    def losses(self, batch):
        from kdbench.losses import dafl_activation_loss, dafl_entropy_loss, dafl_one_hot_loss

        z, y, idx = batch
        x = self.generator(z)
        self._bn_sink[0] = [] if self.bn_layers else None
        try:
            t = self.teacher(x, self.gen_taps)
            bn = self._bn_sink[0]
        finally:
            self._bn_sink[0] = None
        terms: dict[str, torch.Tensor] = {}
        if self.one_hot > 0:
            terms["gen/one_hot"] = self.one_hot * dafl_one_hot_loss(t.logits)
        if self.activation > 0:
            terms["gen/activation"] = self.activation * dafl_activation_loss(
                t.features["embedding"]
            )
        if self.entropy > 0:
            terms["gen/entropy"] = self.entropy * dafl_entropy_loss(t.logits)
        if bn:
            terms["gen/bn"] = self.bn_weight * torch.stack(bn).sum()
        s = self.student(x.detach(), self.method.taps)
        target = t.map(torch.Tensor.detach)
        return {**self.method.distill_terms(s, target, y, self.current_epoch, idx), **terms}
