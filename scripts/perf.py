"""kdbench's speed against a hand-written PyTorch loop, its start-up, and its caches.

Writes results/perf.md. Sections:

0. Pieces: the per-step operations kdbench does differently from an idiomatic loop (fused
   optimizer, index_select gathers, plain-function losses), each timed alone.
1. Overhead: training throughput (samples/s over whole training epochs, validation excluded)
   of kdbench and of a minimal plain PyTorch loop doing the same forward/backward/optimizer
   work on the same models and data, alternated in this process (``--rounds`` times), for
   offline kd (cnn1d -> mlp), offline at (cnn1d -> cnn1d_small) and online kd (DML, both
   peers trained). The first epoch of each run is warm-up and not counted. Two plain loops:
   idiomatic PyTorch, and the same tuned as kdbench is (ratio = orchestration overhead).
2. Teacher-output cache: epoch throughput of offline kd with the cache on vs off (teacher
   forward every step), and the fit start-up of a run that fills the cross-run cache vs one
   that reads it.
3. Start-up, in fresh processes: ``--help``, a config error, time to the first training step.
4. Cold vs warm default run (``python -m kdbench``): empty cache vs data and teacher cached.
5. Flagship (``--only flagship``): the RKD loss alone, its direct O(B^3 D) form (written here)
   against kdbench's Gram-matrix forms (PyTorch, the CPU kernel), and the wall time of
   ``python -m kdbench method=rkd scheme=online`` against ``method=kd scheme=online``,
   alternated; ``--before PATH`` also times another checkout (e.g. ``git worktree add
   /tmp/kdb_head HEAD``).

6. Text (``--only text``): tokens/s of offline token-level kd on shakespeare_char (gpt_small ->
   gpt_tiny) against a hand-written loop doing the same, alternated.

Usage: python scripts/perf.py [--rounds 3] [--epochs 4] [--repeats 3] [--out results/perf.md]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kdbench.losses import attention_loss, kd_loss  # noqa: E402

# The benchmarked pairs: (label, overrides, plain-loop kind)
CASES = [
    ("offline kd, cnn1d (88k) -> mlp (15k)", ["method=kd"], "kd"),
    ("offline at, cnn1d (88k) -> cnn1d_small (3.5k)", ["method=at", "student=cnn1d_small"], "at"),
    ("online kd (DML), peers cnn1d + mlp", ["method=kd", "scheme=online"], "online"),
]


def commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return out.stdout.strip() or "?"


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from kdbench.cli import config_dir

    with initialize_config_dir(config_dir(), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


class EpochTimer(L.Callback):
    """Seconds and samples of each training epoch, from its start to its last batch's end
    (validation, which runs after the last batch, is not counted); and fit start-up."""

    def __init__(self) -> None:
        self.epochs: list[tuple[float, int]] = []
        self.fit_start = self.first_epoch = None

    def on_fit_start(self, trainer, module):
        self.fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer, module):
        if self.first_epoch is None:
            self.first_epoch = time.perf_counter()
        self._t, self._n = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._n += len(batch[0])
        if batch_idx == trainer.num_training_batches - 1:
            self.epochs.append((time.perf_counter() - self._t, self._n))


def throughput(epochs: list[tuple[float, int]]) -> float:
    """Samples/s over the epochs after the first."""
    rest = epochs[1:] or epochs
    return sum(n for _, n in rest) / sum(t for t, _ in rest)


def run_kdbench(overrides: list[str], workdir: Path, callbacks=()) -> EpochTimer:
    from kdbench.run import run

    cfg = compose(
        [
            *overrides,
            "trainer.enable_progress_bar=false",
            "efficiency.enabled=false",
            f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
            "mlflow.experiment=perf",
        ]
    )
    timer = EpochTimer()
    os.environ["KDBENCH_PRINT_METRICS"] = "0"
    run(cfg, callbacks=[timer, *callbacks], root=workdir / "run")
    return timer


def labelled_ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean CE over the labelled samples (y >= 0), 0 if none: the plain loops' CE term."""
    return F.cross_entropy(z, y, ignore_index=-1, reduction="sum") / (y >= 0).sum().clamp_min(1)


def cosine_lr(opt, total: int):
    """Per-step cosine schedule to 0 at step ``total``: the plain loops' schedule."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0)))
    )


# -- the plain PyTorch loop -----------------------------------------------------------------
def plain_loop(
    kind: str, overrides: list[str], epochs: int, tuned: bool = False
) -> list[tuple[float, int]]:
    """The same work as kdbench's run of ``overrides``, hand-written: data as tensors, shuffled
    with randperm, teacher outputs computed once (as kdbench's in-run cache does), Adam with a
    per-step cosine schedule, gamma * CE + alpha * KD (+ beta * AT).

    ``tuned=False``: idiomatic PyTorch (``Adam(params, lr)``, ``x[idx]``, ``opt.zero_grad()``).
    ``tuned=True``: the same speed-ups kdbench applies (torch's fused Adam kernel, gathers
    with ``index_select``, gradients set to None directly), so the ratio is the orchestration
    overhead alone."""
    from hydra.utils import instantiate

    from kdbench.models import create_model
    from kdbench.taps import TappedModel
    from kdbench.teacher import resolve_teacher

    cfg = compose([*overrides, f"trainer.max_epochs={epochs}"])
    dm = instantiate(cfg.dataset, _convert_="all")
    dm.prepare_data()
    dm.setup()
    dm.use_transfer = True
    ds = dm.distill_set()
    x_all, y_all = ds.x, ds.y
    kw = {"num_classes": dm.num_classes, "input_shape": dm.input_shape}
    student = create_model(cfg.student.arch, **kw, **cfg.student.kwargs)
    teacher = create_model(cfg.teacher.arch, **kw, **cfg.teacher.kwargs)
    m = cfg.method
    gamma, alpha, beta, temp = m.gamma, m.alpha, m.beta, m.temperature

    def stage_hooks(model):
        feats: list[torch.Tensor] = []
        for path in model.default_taps["stages"]:
            model.get_submodule(path).register_forward_hook(lambda _m, _i, o: feats.append(o))
        return feats

    if kind == "online":
        peers = [teacher, student]
    else:
        with tempfile.TemporaryDirectory() as tmp:  # the cached teacher of kdbench's runs
            resolve_teacher(cfg, dm, TappedModel(teacher, {}), Path(tmp))
        teacher.eval()
        peers = [student]
        t_feats = stage_hooks(teacher) if kind == "at" else None
        s_feats = stage_hooks(student) if kind == "at" else None
        with torch.no_grad():
            t_logits, t_maps = [], []
            for i in range(0, len(x_all), dm.eval_batch_size):
                t_logits.append(teacher(x_all[i : i + dm.eval_batch_size]))
                if kind == "at":
                    t_maps.append(list(t_feats))
                    t_feats.clear()
            t_logits = torch.cat(t_logits)
            t_maps = [torch.cat(parts) for parts in zip(*t_maps, strict=True)] if t_maps else []
    opts = [torch.optim.Adam(p.parameters(), lr=cfg.optim.lr, fused=tuned) for p in peers]
    trained = [p for peer in peers for p in peer.parameters()]

    def rows(t, idx):
        return t.index_select(0, idx) if tuned else t[idx]

    def zero_grad():
        if tuned:
            for p in trained:
                p.grad = None
        else:
            for o in opts:
                o.zero_grad()

    n, bs = len(x_all), dm.batch_size
    steps = epochs * ((n + bs - 1) // bs)
    scheds = [cosine_lr(o, steps) for o in opts]
    for p in peers:
        p.train()

    out = []
    for _ in range(epochs):
        start = time.perf_counter()
        perm = torch.randperm(n)
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            x, y = rows(x_all, idx), rows(y_all, idx)
            if kind == "online":
                za, zb = teacher(x), student(x)
                loss = gamma * (labelled_ce(za, y) + labelled_ce(zb, y)) + alpha * (
                    kd_loss(za, zb.detach(), temp) + kd_loss(zb, za.detach(), temp)
                )
            else:
                z = student(x)
                loss = gamma * labelled_ce(z, y)
                if alpha > 0:
                    loss = loss + alpha * kd_loss(z, rows(t_logits, idx), temp)
                if kind == "at":
                    t_stages = [rows(t, idx) for t in t_maps]
                    loss = loss + beta * attention_loss(list(s_feats), t_stages)
                    s_feats.clear()
            zero_grad()
            loss.backward()
            for o, s in zip(opts, scheds, strict=True):
                o.step()
                s.step()
        out.append((time.perf_counter() - start, n))
    return out


# -- subprocess timings ---------------------------------------------------------------------
def timed(cmd, cwd, env, check=True) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {proc.stderr.decode()[-500:]}")
    return time.perf_counter() - start


FIRST_STEP = """
import sys, time
import lightning as L
from hydra import compose, initialize_config_dir
from kdbench.cli import config_dir
from kdbench.run import run
class First(L.Callback):
    def on_train_batch_start(self, *a):
        print("FIRST_STEP", time.time(), flush=True)
        sys.exit(0)
with initialize_config_dir(config_dir(), version_base="1.3"):
    cfg = compose("config", overrides=["trainer.enable_progress_bar=false"])
run(cfg, callbacks=[First()])
"""


def first_step_seconds(cwd, env) -> float:
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", FIRST_STEP], cwd=cwd, env=env, capture_output=True, text=True
    )
    for line in proc.stdout.splitlines():
        if line.startswith("FIRST_STEP"):
            return float(line.split()[1]) - start
    raise RuntimeError(f"no first step: {proc.stderr[-500:]}")


def fmt(xs, unit="s", digits=2):
    runs = ", ".join(f"{x:.{digits}f}" for x in xs)
    return f"{statistics.median(xs):.{digits}f} {unit} (runs: {runs})"


def cifar_section(tmp: Path, batches: int = 12) -> list[str]:
    """resnet32x4 -> resnet8x4 kd on CIFAR-100-shaped data (generated: speed does not depend on
    the pixels or the weights), the reference batch of 64 with augmentation (so the teacher runs
    every step), timed over ``batches`` training steps after a warm-up epoch."""
    from kdbench.data.cifar import write_fake_cifar
    from kdbench.models import create_model

    root = write_fake_cifar(tmp / "cifar", 100, n_train=64 * batches, n_test=64)
    teacher = tmp / "r32x4.pt"
    torch.save(
        create_model("resnet32x4", num_classes=100, input_shape=(3, 32, 32)).state_dict(), teacher
    )
    t = run_kdbench(
        [
            "experiment=cifar100_r32x4_r8x4",
            "method=kd",
            f"dataset.root={root}",
            f"teacher.checkpoint={teacher}",
            "trainer.max_epochs=2",
            "steps_per_call=1",
        ],
        tmp / "cifar-run",
    )
    sec, n = t.epochs[-1]
    per_step = sec / (n / 64)
    return [
        "## CIFAR-100 resnet32x4 -> resnet8x4 kd on this CPU (reference batch 64, augmentation on)",
        "",
        f"{n} images ({n // 64} steps) in {sec:.1f} s: **{per_step:.2f} s/step, "
        f"{n / sec:.0f} images/s**; an epoch of 50000 images (782 steps) would take "
        f"~{per_step * 782 / 60:.0f} min, the 240-epoch recipe "
        f"~{per_step * 782 * 240 / 3600:.0f} h "
        "on this machine. (No GPU was available to measure the GPU figure.)",
        "",
    ]


class Interleaved(L.Callback):
    """Offline kd, kdbench and the tuned plain loop interleaved in one fit: after each batch
    kdbench's Lightning loop serves (``k`` steps), the plain loop does ``k`` steps of its own
    (own copy of the student, same data and cached teacher logits, fused Adam, cosine
    schedule), so both see the same machine state; drift and noise hit both alike. Epoch 0 is
    warm-up. kdbench's time runs from the epoch start (first fetch included) to its last
    batch, minus the plain loop's turns."""

    def __init__(self) -> None:
        self.ours = self.plain = 0.0
        self.steps = 0

    def on_train_epoch_start(self, trainer, m):
        if not hasattr(self, "student"):
            dm, method = trainer.datamodule, m.method
            ds = dm.distill_set()
            self.x, self.y, self.t = ds.x, ds.y, m._teacher_cache.logits
            self.bs, self.method = dm.batch_size, method
            self.student = copy.deepcopy(m.student.model)  # kdbench's architecture, own weights
            self.student.train()
            self.opt = torch.optim.Adam(self.student.parameters(), lr=m.optim_cfg.lr, fused=True)
            self.sched = cosine_lr(self.opt, trainer.max_epochs * math.ceil(len(self.x) / self.bs))
            self.order, self.pos = torch.randperm(len(self.x)), 0
        self.last = time.perf_counter()

    def _plain_steps(self, k: int) -> None:
        params = list(self.student.parameters())
        for _ in range(k):
            if self.pos >= len(self.x):
                self.order, self.pos = torch.randperm(len(self.x)), 0
            idx = self.order[self.pos : self.pos + self.bs]
            self.pos += self.bs
            x, y = self.x.index_select(0, idx), self.y.index_select(0, idx)
            z = self.student(x)
            t = self.t.index_select(0, idx)
            m = self.method
            loss = m.gamma * labelled_ce(z, y) + m.alpha * kd_loss(z, t, m.temperature)
            for p in params:
                p.grad = None
            loss.backward()
            self.opt.step()
            self.sched.step()

    def on_train_batch_end(self, trainer, m, outputs, batch, batch_idx):
        now = time.perf_counter()
        if trainer.current_epoch == 0:
            return
        k = math.ceil(len(batch[0]) / self.bs)
        self.ours += now - self.last
        self.steps += k
        start = time.perf_counter()
        self._plain_steps(k)
        self.plain += time.perf_counter() - start
        self.last = time.perf_counter()


# -- text: token-level KD of a language model ------------------------------------------------
TEXT = ["experiment=shakespeare_char", "method=kd"]


def plain_text_loop(overrides: list[str], epochs: int, tuned: bool) -> list[tuple[float, int]]:
    """Token-level KD of gpt_tiny from the cached gpt_small teacher, hand-written: the teacher's
    logits over the distillation set computed once (as kdbench's cache does), Adam with a
    per-step cosine schedule, ``gamma * CE + alpha * T^2 KL`` per token (labels -1 on the
    transfer windows: no CE there). ``tuned``: fused Adam and ``index_select`` gathers, as
    kdbench does. Returns (seconds, sequences) per epoch."""
    from hydra.utils import instantiate

    from kdbench.models import create_model
    from kdbench.taps import TappedModel
    from kdbench.teacher import resolve_teacher

    cfg = compose([*overrides, f"trainer.max_epochs={epochs}"])
    dm = instantiate(cfg.dataset, _convert_="all")
    dm.prepare_data()
    dm.setup()
    dm.use_transfer = True
    ds = dm.distill_set()
    x_all, y_all = ds.x.long(), ds.y
    kw = {"num_classes": dm.num_classes, "input_shape": dm.input_shape}
    student = create_model(cfg.student.arch, **kw, **cfg.student.kwargs)
    teacher = create_model(cfg.teacher.arch, **kw, **cfg.teacher.kwargs)
    with tempfile.TemporaryDirectory() as tmp:  # the cached teacher of kdbench's runs
        resolve_teacher(cfg, dm, TappedModel(teacher, {}), Path(tmp))
    teacher.eval()
    with torch.no_grad():
        t_logits = torch.cat([teacher(x_all[i : i + 256]) for i in range(0, len(x_all), 256)])
    m = cfg.method
    gamma, alpha, temp = m.gamma, m.alpha, m.temperature
    opt = torch.optim.Adam(student.parameters(), lr=cfg.optim.lr, fused=tuned)
    n, bs = len(x_all), dm.batch_size
    sched = cosine_lr(opt, epochs * ((n + bs - 1) // bs))
    student.train()
    out = []
    for _ in range(epochs):
        start = time.perf_counter()
        perm = torch.randperm(n)
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            if tuned:
                x, y, zt = (t.index_select(0, idx) for t in (x_all, y_all, t_logits))
            else:
                x, y, zt = x_all[idx], y_all[idx], t_logits[idx]
            z = student(x)
            v = z.shape[-1]
            loss = gamma * labelled_ce(z.reshape(-1, v), y.reshape(-1)) + alpha * kd_loss(
                z.reshape(-1, v), zt.reshape(-1, v), temp
            )
            if tuned:
                for p in student.parameters():
                    p.grad = None
            else:
                opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        out.append((time.perf_counter() - start, n))
    return out


def text_section(tmp: Path, rounds: int, epochs: int) -> list[str]:
    """kdbench's offline token-level kd on shakespeare_char against the hand-written loop."""
    ours, plain, tuned = [], [], []
    context = int(compose(TEXT).dataset.context)
    for r in range(rounds):
        ov = [*TEXT, f"trainer.max_epochs={epochs}"]
        (tmp / f"text{r}").mkdir(parents=True, exist_ok=True)
        ours.append(throughput(run_kdbench(ov, tmp / f"text{r}").epochs))
        plain.append(throughput(plain_text_loop(TEXT, epochs, tuned=False)))
        tuned.append(throughput(plain_text_loop(TEXT, epochs, tuned=True)))
        print(
            f"text: round {r}: kdbench {ours[-1] * context:.0f} tokens/s, plain "
            f"{plain[-1] * context:.0f}, tuned plain {tuned[-1] * context:.0f}",
            flush=True,
        )

    def ratio(base):
        xs = [a / b for a, b in zip(ours, base, strict=True)]
        return f"{statistics.median(xs):.2f}x (rounds: {', '.join(f'{x:.2f}' for x in xs)})"

    def tok(xs):
        return f"{statistics.median(xs) * context:.0f}"

    return [
        "## Text: token-level KD of a language model (shakespeare_char, gpt_small -> gpt_tiny)",
        "",
        f"`experiment=shakespeare_char method=kd` (windows of {context} characters, batch 64, "
        "per-token CE + T^2 KL, the teacher's logits cached) against a hand-written loop doing "
        f"the same: training tokens/s over epochs 2..{epochs}, median of {rounds} alternated "
        "rounds.",
        "",
        "| | tokens/s | kdbench / this |",
        "|---|---|---|",
        f"| kdbench | {tok(ours)} | |",
        f"| plain PyTorch loop | {tok(plain)} | **{ratio(plain)}** |",
        f"| tuned plain loop (fused Adam, index_select) | {tok(tuned)} | {ratio(tuned)} |",
        "",
    ]


def interleaved_section(tmp: Path, epochs: int) -> list[str]:
    probe = Interleaved()
    run_kdbench(["method=kd", f"trainer.max_epochs={epochs}"], tmp / "interleaved", [probe])
    ours, plain = probe.ours / probe.steps * 1e3, probe.plain / probe.steps * 1e3
    return [
        "## Overhead, interleaved: offline kd (cnn1d -> mlp) in one fit",
        "",
        f"kdbench's Lightning loop and the tuned plain loop take turns after every served batch "
        f"of kdbench, over epochs 2..{epochs} ({probe.steps} steps each): the same machine state "
        "for both, so far less noise than whole runs alternated.",
        "",
        "| | ms per step | kdbench / tuned plain |",
        "|---|---|---|",
        f"| kdbench (whole epochs, Lightning loop included) | {ours:.3f} "
        f"| **{plain / ours:.2f}x** |",
        f"| tuned plain loop | {plain:.3f} | |",
        "",
    ]


def best_us(fn, number: int = 300, repeat: int = 7) -> float:
    """Microseconds per call: the best of ``repeat`` timings of ``number`` calls."""
    import timeit

    fn()
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def pieces_section() -> list[str]:
    """The per-step pieces kdbench does differently from an idiomatic loop, each timed alone."""
    import functools

    from hydra.utils import instantiate

    from kdbench.losses import attention_loss
    from kdbench.models import create_model

    rows = []
    for arch, kw, classes, shape in (
        ("mlp", {"hidden": [100, 100]}, 10, (1, 40)),
        ("cnn1d", {"channels": [64, 64, 128, 128]}, 10, (1, 40)),
        ("resnet8x4", {}, 100, (3, 32, 32)),
    ):
        model = create_model(arch, num_classes=classes, input_shape=shape, **kw)
        n = sum(p.numel() for p in model.parameters())
        for name, make in (
            ("Adam", lambda ps, f: torch.optim.Adam(ps, lr=1e-3, fused=f)),
            (
                "SGD momentum",
                lambda ps, f: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4, fused=f),
            ),
        ):
            times = []
            for fused in (None, True):
                params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
                for p in params:
                    p.grad = torch.randn_like(p)
                times.append(best_us(make(params, fused).step))
            rows.append(
                f"| {name} step, {arch} ({n / 1000:.1f}k parameters): torch default vs fused "
                f"(`optim.fused: auto`) | {times[0]:.0f} us | {times[1]:.0f} us | "
                f"{times[0] / times[1]:.1f}x |"
            )
    x = torch.randn(23600, 1, 40)
    for size in (128, 4096):
        idx = torch.randperm(len(x))[:size]
        a, b = best_us(lambda idx=idx: x[idx]), best_us(lambda idx=idx: x.index_select(0, idx))
        rows.append(
            f"| gather {size} of 23600 MNIST-1D rows: `x[idx]` vs `x.index_select(0, idx)` "
            f"| {a:.0f} us | {b:.0f} us | {a / b:.1f}x |"
        )
    hydra = instantiate({"_target_": "kdbench.losses.attention_loss", "_partial_": True})
    plain = functools.partial(attention_loss)
    s = [torch.randn(128, 16, 20), torch.randn(128, 32, 10)]
    t = [torch.randn(128, 64, 20), torch.randn(128, 128, 10)]
    a, b = best_us(lambda: hydra(s, t)), best_us(lambda: plain(s, t))
    rows.append(
        f"| attention loss (2 stages, batch 128): Hydra `_partial_` vs plain partial "
        f"| {a:.0f} us | {b:.0f} us | {a / b:.1f}x |"
    )
    return [
        "## Pieces: what a step does differently from an idiomatic loop (timed alone)",
        "",
        "Best of 7 timings (`timeit`).",
        "",
        "| piece | idiomatic | kdbench | speed-up |",
        "|---|---|---|---|",
        *rows,
        "",
    ]


# -- flagship: python -m kdbench method=rkd scheme=online -----------------------------------
def rkd_direct_reference(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD in its direct O(B^3 D) form (kdbench's until the Gram-matrix form replaced it):
    all differences e_i - e_j (B x B x D), normalised, then a batched inner product; kept here
    as the "before" of the flagship section."""

    def relations(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = e.float().reshape(e.shape[0], -1)
        diff = e.unsqueeze(0) - e.unsqueeze(1)
        d = diff.pow(2).sum(dim=2).clamp(min=1e-12).sqrt()
        d = d.masked_fill(torch.eye(e.shape[0], dtype=torch.bool), 0.0)
        unit = F.normalize(diff, p=2.0, dim=2)
        return d / d[d > 0].mean(), torch.bmm(unit, unit.transpose(1, 2)).reshape(-1)

    with torch.no_grad():
        d_t, psi_t = relations(teacher)
    d_s, psi_s = relations(student)
    return 25.0 * F.smooth_l1_loss(d_s, d_t) + 50.0 * F.smooth_l1_loss(psi_s, psi_t)


def flagship_section(
    tmp: Path, rounds: int, before: str | None, extra: list[str], threads: int | None
) -> list[str]:
    """The rkd loss alone (direct form vs kdbench's), then the wall time of the two online
    commands, alternated (and of a ``before`` checkout's, via PYTHONPATH, when given);
    ``threads``: OMP_NUM_THREADS of the commands (steadier on a loaded machine)."""
    from kdbench.losses import rkd_loss

    lines = [
        "## Flagship command: `python -m kdbench method=rkd scheme=online` vs `method=kd`",
        "",
        "RKD loss alone, forward + backward, batch 128 (student D as given, teacher D 128), "
        f"median of {rounds} alternated rounds of 5 calls (best call of each round), "
        f"{torch.get_num_threads()} threads: the direct O(B^3 D) form, kdbench's PyTorch "
        "Gram form (its GPU path) and kdbench's CPU kernel (kdbench/kernels.py, what a CPU run "
        "uses):",
        "",
        "| D | direct O(B^3 D) form | PyTorch Gram form | CPU kernel | kernel vs direct "
        "| max abs diff of the value | max abs diff of the gradient / its max |",
        "|---|---|---|---|---|---|---|",
    ]
    from kdbench import losses

    def torch_form(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kernels, losses._KERNELS = losses._KERNELS, None
        try:
            return rkd_loss(x, t)
        finally:
            losses._KERNELS = kernels

    forms = (("old", rkd_direct_reference), ("torch", torch_form), ("new", rkd_loss))
    gen = torch.Generator().manual_seed(0)
    for dim in (100, 128, 256):
        s = torch.relu(torch.randn(128, dim, generator=gen)) * 2.0 + 1.0
        t = torch.relu(torch.randn(128, 128, generator=gen))
        times: dict[str, list[float]] = {name: [] for name, _ in forms}
        for _ in range(rounds):
            for name, fn in forms:
                best = math.inf
                for _ in range(5):
                    x = s.clone().requires_grad_()
                    start = time.perf_counter()
                    fn(x, t).backward()
                    best = min(best, time.perf_counter() - start)
                times[name].append(best * 1e3)
        a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
        va, vb = rkd_direct_reference(a, t), rkd_loss(b, t)
        va.backward(), vb.backward()
        old, mid, new = (statistics.median(times[k]) for k in ("old", "torch", "new"))
        grad = ((a.grad - b.grad).abs().max() / a.grad.abs().max()).item()
        lines.append(
            f"| {dim} | {old:.1f} ms | {mid:.1f} ms | {new:.1f} ms | {old / new:.1f}x "
            f"| {abs(va.item() - vb.item()):.1e} | {grad:.1e} |"
        )
    env = {**os.environ, "KDBENCH_CACHE_DIR": str(tmp / "cache"), "KDBENCH_PRINT_METRICS": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)  # every run: a fresh store in its own directory
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    py = [sys.executable, "-m", "kdbench", "scheme=online", *extra]
    warm = tmp / "flagship_warm"
    warm.mkdir()
    timed([*py, "method=kd", "trainer.max_epochs=1", "+trainer.limit_train_batches=1"], warm, env)
    trees = [("working tree", None)] + ([("before", before)] if before else [])
    walls: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds):
        for tree, path in trees:
            e = {**env, "PYTHONPATH": path} if path else env
            for method in ("kd", "rkd"):
                wd = tmp / f"flagship_{r}_{method}_{'b' if path else 'w'}"
                wd.mkdir()
                walls.setdefault((tree, method), []).append(timed([*py, f"method={method}"], wd, e))
                print(f"flagship round {r}: {tree} {method} {walls[tree, method][-1]:.1f} s")
    shown = " ".join(["scheme=online", *extra])
    lines += [
        "",
        f"Wall time of `python -m kdbench method=... {shown}` (fresh MLflow store per run, data "
        f"cached; the online scheme trains both peers, no teacher cache), {rounds} alternated "
        "rounds"
        + (f", OMP_NUM_THREADS={threads}" if threads else "")
        + (f"; *before*: `PYTHONPATH={before}`" if before else "")
        + ":",
        "",
        "| code | method=kd | method=rkd | rkd / kd (per round) |",
        "|---|---|---|---|",
    ]
    for tree, _ in trees:
        kd, rkd = walls[tree, "kd"], walls[tree, "rkd"]
        ratios = [b / a for a, b in zip(kd, rkd, strict=True)]
        lines.append(
            f"| {tree} | {fmt(kd, digits=1)} | {fmt(rkd, digits=1)} | "
            f"{statistics.median(ratios):.2f}x ({', '.join(f'{x:.2f}' for x in ratios)}) |"
        )
    return [*lines, ""]


SECTIONS = ["pieces", "overhead", "interleaved", "cache", "startup", "wall", "cifar", "flagship"]
SECTIONS += ["text"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3, help="kdbench/plain alternations per case")
    p.add_argument("--epochs", type=int, default=4, help="epochs per run (first is warm-up)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the subprocess timings")
    p.add_argument("--out", default=str(ROOT / "results" / "perf.md"))
    p.add_argument("--threads", type=int, help="torch threads in this process (default: torch's)")
    p.add_argument("--append", action="store_true", help="with --only: append to --out")
    p.add_argument(
        "--only",
        choices=SECTIONS,
        nargs="*",
    )
    p.add_argument(
        "--before",
        help="flagship: also time this checkout of kdbench (PYTHONPATH), e.g. a git worktree",
    )
    p.add_argument(
        "--flagship-overrides",
        nargs="*",
        default=[],
        help="flagship: extra overrides of both commands (default: none, the full recipe)",
    )
    p.add_argument("--cases", nargs="*", choices=[k for _, _, k in CASES], help="overhead cases")
    p.add_argument(
        "--cache-dir",
        help="reuse this kdbench cache (trained teachers, data) instead of a fresh one, e.g. "
        "~/.cache/kdbench after scripts/text_grid.sh (the cold/warm sections keep their own)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = set(args.only or SECTIONS)
    lines = [
        "---" if args.append else "# kdbench speed: overhead against a plain PyTorch loop, caches",
        "",
        f"Produced by `python {' '.join(sys.argv)}` on {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}, kdbench {commit()}. MNIST-1D, batch 128, "
        "4000 - 400 labelled + 20000 transfer samples per epoch.",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["KDBENCH_CACHE_DIR"] = args.cache_dir or str(tmp / "cache")
        if "pieces" in sections:
            lines += pieces_section()
        if "overhead" in sections:
            lines += [
                "## Overhead: kdbench vs a hand-written loop (same models, data, loss, optimizer)",
                "",
                f"Training samples/s over epochs 2..{args.epochs} of each run (validation not "
                f"counted), median of {args.rounds} alternated rounds (kdbench, plain, tuned "
                "plain). *Plain*: idiomatic PyTorch (`torch.optim.Adam(params, lr)`, `x[idx]`, "
                "`opt.zero_grad()`). *Tuned plain*: the same loop with the speed-ups kdbench "
                "applies (fused Adam kernel, `index_select` gathers, grads set to None), so "
                "kdbench / tuned is the orchestration overhead alone.",
                "",
                "| case | kdbench samples/s | plain samples/s | **kdbench / plain** "
                "| tuned plain samples/s | kdbench / tuned plain |",
                "|---|---|---|---|---|---|",
            ]
            for label, overrides, kind in CASES:
                if args.cases and kind not in args.cases:
                    continue
                ours, plain, tuned = [], [], []
                for r in range(args.rounds):
                    ov = [*overrides, f"trainer.max_epochs={args.epochs}"]
                    ours.append(throughput(run_kdbench(ov, tmp / f"{kind}{r}").epochs))
                    plain.append(throughput(plain_loop(kind, overrides, args.epochs)))
                    tuned.append(throughput(plain_loop(kind, overrides, args.epochs, tuned=True)))
                    print(
                        f"{label}: round {r}: kdbench {ours[-1]:.0f}/s, plain {plain[-1]:.0f}/s, "
                        f"tuned plain {tuned[-1]:.0f}/s",
                        flush=True,
                    )

                def ratios(base, ours=ours):
                    xs = [a / b for a, b in zip(ours, base, strict=True)]
                    rounds = ", ".join(f"{x:.2f}" for x in xs)
                    return f"{statistics.median(xs):.2f}x (rounds: {rounds})"

                lines.append(
                    f"| {label} | {statistics.median(ours):.0f} | {statistics.median(plain):.0f} "
                    f"| **{ratios(plain)}** | {statistics.median(tuned):.0f} | {ratios(tuned)} |"
                )
            lines.append("")
        if "interleaved" in sections:
            lines += interleaved_section(tmp, max(args.epochs, 6))
        if "cache" in sections:
            lines += [
                "## Teacher-output cache (offline kd, cnn1d 88k teacher -> mlp 15k student)",
                "",
                "| setting | training samples/s | fit start to first epoch |",
                "|---|---|---|",
            ]
            rows = {}
            for r in range(args.rounds):
                for name, ov in (
                    ("off (teacher forward every step)", ["teacher_output_cache.enabled=false"]),
                    ("on, filled by this run", ["teacher_output_cache.dir=" + str(tmp / f"o{r}")]),
                    (
                        "on, read from an earlier run",
                        ["teacher_output_cache.dir=" + str(tmp / f"o{r}")],
                    ),
                ):
                    t = run_kdbench([*ov, f"trainer.max_epochs={args.epochs}"], tmp / f"c{r}")
                    rows.setdefault(name, []).append(
                        (throughput(t.epochs), t.first_epoch - t.fit_start)
                    )
            base = statistics.median(x for x, _ in rows["off (teacher forward every step)"])
            for name, vals in rows.items():
                thr = statistics.median(x for x, _ in vals)
                lines.append(
                    f"| {name} | {thr:.0f} ({thr / base:.2f}x) | {fmt([s for _, s in vals])} |"
                )
            lines.append("")
        env = {**os.environ, "KDBENCH_CACHE_DIR": str(tmp / "cache")}
        env.pop("MLFLOW_TRACKING_URI", None)
        if "startup" in sections:
            py = [sys.executable, "-m", "kdbench"]
            helpt = [timed([*py, "--help"], tmp, env) for _ in range(args.repeats)]
            errt = [timed([*py, "seed=-1"], tmp, env, check=False) for _ in range(args.repeats)]
            errm = [
                timed([*py, "method.temperature=0"], tmp, env, check=False)
                for _ in range(args.repeats)
            ]
            first = [first_step_seconds(tmp, env) for _ in range(args.repeats)]
            lines += [
                "## Start-up (fresh processes, teacher cached)",
                "",
                "| command | wall time |",
                "|---|---|",
                f"| `python -m kdbench --help` | {fmt(helpt)} |",
                f"| `python -m kdbench seed=-1` (config error, exit 2) | {fmt(errt)} |",
                "| `python -m kdbench method.temperature=0` (config error, exit 2) | "
                f"{fmt(errm)} |",
                f"| launch to the first training step of the default run | {fmt(first)} |",
                "",
            ]
        if "wall" in sections:
            cmd = [sys.executable, "-m", "kdbench", "trainer.enable_progress_bar=false"]
            cold, warm = [], []
            for r in range(args.repeats):
                wd = tmp / f"wall{r}"
                wd.mkdir()
                e = {**env, "KDBENCH_CACHE_DIR": str(wd / "cache")}
                cold.append(timed(cmd, wd, e))
                warm.append(timed(cmd, wd, e))
            lines += [
                "## Cold vs warm: `python -m kdbench` (kd, cnn1d -> mlp, 15 epochs)",
                "",
                "| case | wall time |",
                "|---|---|",
                "| cold: new directory, empty cache (data generated, teacher trained, teacher "
                f"outputs computed, new MLflow store) | {fmt(cold, digits=1)} |",
                f"| warm: data, teacher and teacher outputs cached | {fmt(warm, digits=1)} |",
                "",
            ]
        if "cifar" in sections:
            lines += cifar_section(tmp)
        if "text" in sections:
            lines += text_section(tmp, args.rounds, max(args.epochs, 2))
        if "flagship" in sections:
            lines += flagship_section(
                tmp, args.rounds, args.before, args.flagship_overrides, args.threads
            )
    text = "\n".join(lines)
    if args.only is None:
        Path(args.out).write_text(text)
    elif args.append:
        with open(args.out, "a") as f:
            f.write("\n" + text)
    print(text)


if __name__ == "__main__":
    main()
