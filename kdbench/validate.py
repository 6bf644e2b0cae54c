"""Checks of the composed config that need nothing but the config (no torch, no Lightning).

The CLI runs them before importing anything heavy, so a bad value is reported in well under
2 seconds; :func:`kdbench.run.prepare` runs them too (for the Python API and the tuner), and
then checks what needs the models and data (taps, shapes, trainer options).
"""

from __future__ import annotations

import itertools
import math
import os

from omegaconf import DictConfig, ListConfig

from kdbench.errors import ConfigError, KdbenchError
from kdbench.modelspec import check_model_config

KNOWLEDGE_TYPES = ("none", "response", "feature", "attention", "relation")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("cosine", "multistep", "none")


def _number(key: str, value, low: float, strict: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and not math.isinf(value)
    ok = ok and (value > low if strict else value >= low)
    if not ok:
        raise ConfigError(key, value, f"must be a finite number {'>' if strict else '>='} {low}")


def _fraction(key: str, value, what: str, high_open: bool = False, low_open: bool = False):
    """``value`` is a number in [0, 1] (ends excluded as asked); ``what`` says the range."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        raise ConfigError(key, value, f"must be a number {what}")


def check_method(m: DictConfig) -> None:
    if m.knowledge not in KNOWLEDGE_TYPES:
        raise ConfigError(
            "method.knowledge", m.knowledge, f"must be one of {list(KNOWLEDGE_TYPES)}"
        )
    for key in ("gamma", "alpha", "beta"):
        _number(f"method.{key}", m[key], 0, strict=False)
    _number("method.temperature", m.temperature, 0, strict=True)
    if "beta_mix" in m:  # jsd: the teacher's share of the mixture
        _fraction("method.beta_mix", m.beta_mix, "in [0, 1] (GKD's JSD mixture weight, 0.5)")
    if "skew_alpha" in m:  # skew_kl, skew_reverse_kl
        _fraction(
            "method.skew_alpha", m.skew_alpha, "in [0, 1) (DistiLLM's skew, 0.1)", high_open=True
        )
    if m.gamma == 0 and m.alpha == 0 and m.beta == 0:
        raise ConfigError("method.gamma", 0, "gamma, alpha and beta are all 0: nothing to train on")
    if m.beta > 0 and m.get("term") is None:
        raise ConfigError(
            "method.beta",
            m.beta,
            f"method {m.name} has no method term: leave beta at 0 or pick a method that has one",
        )


# Schemes whose frozen teacher can be a top-K black box (method.teacher_topk)
TOPK_SCHEMES = ("offline", "seqkd", "onpolicy")


def limits_train_batches(trainer: DictConfig) -> bool:
    """Whether ``trainer.limit_train_batches`` cuts the epoch (an int counts batches, 1 too; a
    float is a fraction, 1.0 the whole epoch)."""
    limit = trainer.get("limit_train_batches")
    return limit is not None and not (isinstance(limit, float) and limit == 1.0)


def check_steps_per_call(cfg: DictConfig) -> None:
    """Lightning's ``limit_train_batches`` counts served batches; with ``steps_per_call`` > 1
    each would hold that many optimisation steps (and a fraction of an epoch served as one
    batch fails inside Lightning). ``auto`` then serves one step per batch (data/base.py);
    an explicit number above 1 is refused."""
    steps = cfg.get("steps_per_call", "auto")
    if steps not in ("auto", 1) and limits_train_batches(cfg.trainer):
        raise ConfigError(
            "steps_per_call",
            steps,
            "must be 1 or auto with trainer.limit_train_batches, which Lightning counts in served "
            f"batches (each would hold {steps} optimisation steps)",
        )


def check_teacher_checkpoint(path) -> None:
    """``teacher.checkpoint`` names a file (checked before any import of torch, so the error
    comes at once; kdbench/teacher.py reads it)."""
    if path and not os.path.isfile(os.path.expanduser(str(path))):
        raise KdbenchError(
            f"teacher.checkpoint={str(path)!r} does not exist: give the path of a saved state dict"
        )


def check_teacher_topk(cfg: DictConfig) -> None:
    """``method.teacher_topk``: null or an integer >= 1, with a scheme whose teacher is frozen."""
    k = cfg.method.get("teacher_topk")
    if k is None:
        return
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(
            "method.teacher_topk", k, "must be an integer >= 1 (the teacher's top-K tokens) or null"
        )
    if cfg.scheme.name not in TOPK_SCHEMES:
        raise ConfigError(
            "method.teacher_topk",
            k,
            f"a top-K black-box teacher is frozen: it works with scheme={', '.join(TOPK_SCHEMES)}, "
            f"not scheme={cfg.scheme.name}",
        )


def check_optim(o: DictConfig, key: str) -> None:
    if str(o.name).lower() not in OPTIMIZERS:
        raise ConfigError(f"{key}.name", o.name, f"must be one of {', '.join(OPTIMIZERS)}")
    _number(f"{key}.lr", o.lr, 0, strict=True)
    _number(f"{key}.weight_decay", o.get("weight_decay", 0.0), 0, strict=False)
    betas = o.get("betas")
    if betas is not None:
        ok = isinstance(betas, ListConfig | list) and len(betas) == 2
        ok = ok and all(
            isinstance(b, int | float) and not isinstance(b, bool) and 0 <= b < 1 for b in betas
        )
        if not ok:
            shown = list(betas) if isinstance(betas, ListConfig) else betas
            raise ConfigError(
                f"{key}.betas", shown, "must be two numbers in [0, 1), e.g. [0.9, 0.999]"
            )
    scheduler = o.get("scheduler", "none")
    if str(scheduler).lower() not in SCHEDULERS:
        raise ConfigError(f"{key}.scheduler", scheduler, f"must be one of {', '.join(SCHEDULERS)}")
    fused = o.get("fused", "auto")
    if fused != "auto" and not isinstance(fused, bool):
        raise ConfigError(f"{key}.fused", fused, "must be auto, true or false")
    momentum = o.get("momentum", 0.9 if str(o.name).lower() == "sgd" else None)
    if momentum is not None:
        _fraction(f"{key}.momentum", momentum, "in [0, 1) (0: plain SGD)", high_open=True)
    dampening = o.get("dampening", 0.0)
    _fraction(f"{key}.dampening", dampening, "in [0, 1)", high_open=True)
    nesterov = o.get("nesterov", False)
    if not isinstance(nesterov, bool):
        raise ConfigError(f"{key}.nesterov", nesterov, "must be true or false")
    if nesterov and (not momentum or dampening):
        raise ConfigError(
            f"{key}.nesterov",
            nesterov,
            f"Nesterov momentum needs {key}.momentum > 0 and {key}.dampening = 0",
        )
    if str(scheduler).lower() == "multistep":
        milestones = o.get("milestones")
        ms = list(milestones) if isinstance(milestones, ListConfig | list) else None
        ok = bool(ms) and all(isinstance(m, int) and not isinstance(m, bool) for m in ms)
        ok = ok and ms[0] > 0 and all(a < b for a, b in itertools.pairwise(ms))
        if not ok:
            shown = ms if ms is not None else milestones
            raise ConfigError(
                f"{key}.milestones",
                shown,
                "must be a list of increasing epochs >= 1, e.g. [150, 180]",
            )
        decay = o.get("lr_decay", 0.1)
        ok = isinstance(decay, int | float) and not isinstance(decay, bool) and 0 < decay <= 1
        if not ok:
            raise ConfigError(f"{key}.lr_decay", decay, "must be a number in (0, 1]")
    ref = o.get("lr_reference_batch")
    if ref is not None:
        _positive_int(f"{key}.lr_reference_batch", ref)


def _positive_int(key: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(key, value, "must be an integer >= 1")


def _int_at_least(key: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(key, value, f"must be >= {low} (a whole number)")


# Sizes fixed by the datasets themselves (for the split checks below).
DIGITS_SAMPLES = 1797  # sklearn.datasets.load_digits: 1797 images of 10 classes
CIFAR_TRAIN = 50000  # CIFAR-10/100 (Krizhevsky 2009): 50000 training images
MNIST1D_CLASSES = 10  # mnist1d's templates: num_samples // 10 samples per class


def check_dataset(d: DictConfig) -> None:
    """Sizes, split fractions and seeds of the ``dataset`` group (the keys each dataset has)."""
    _positive_int("dataset.batch_size", d.get("batch_size"))
    if "eval_batch_size" in d:
        _positive_int("dataset.eval_batch_size", d.eval_batch_size)
    for name in ("val_size", "transfer_size", "split_seed", "seed", "transfer_seed"):
        if name in d:
            _int_at_least(f"dataset.{name}", d[name], 0)
    for name in ("final_seq_length", "image_size", "decode_threads"):
        if d.get(name) is not None:
            _int_at_least(f"dataset.{name}", d[name], 0 if name == "decode_threads" else 1)
    n_train = None
    if "train_split" in d:
        num = d.get("num_samples", 5000)
        _int_at_least("dataset.num_samples", num, 20)
        _fraction(
            "dataset.train_split",
            d.train_split,
            "in (0, 1): the fraction of dataset.num_samples used for training (the rest tests)",
            high_open=True,
            low_open=True,
        )
        total = num // MNIST1D_CLASSES * MNIST1D_CLASSES
        n_train = int(total * d.train_split)
        if n_train < 1 or total - n_train < 1:
            raise ConfigError(
                "dataset.train_split",
                d.train_split,
                f"leaves {n_train} training and {total - n_train} test samples of "
                f"dataset.num_samples={num}: both need at least one",
            )
    if "test_fraction" in d:
        _fraction(
            "dataset.test_fraction", d.test_fraction, "in (0, 1)", high_open=True, low_open=True
        )
        n_test = math.ceil(DIGITS_SAMPLES * d.test_fraction)  # sklearn's train_test_split
        n_train = DIGITS_SAMPLES - n_test
        if min(n_test, n_train) < 10:  # a stratified split needs one sample per class
            raise ConfigError(
                "dataset.test_fraction",
                d.test_fraction,
                f"leaves {n_train} training and {n_test} test samples of {DIGITS_SAMPLES}: "
                "both need at least 10 (one per class)",
            )
    if str(d.get("_target_", "")).startswith("kdbench.data.cifar."):
        n_train = CIFAR_TRAIN
    if n_train is not None and d.get("val_size", 0) >= n_train:
        raise ConfigError(
            "dataset.val_size", d.val_size, f"must be smaller than the {n_train} training samples"
        )
    if d.get("transfer_size", 0) > 0 and "transfer_seed" in d and d.transfer_seed == d.get("seed"):
        raise ConfigError(
            "dataset.transfer_seed",
            d.transfer_seed,
            "must differ from dataset.seed, or the transfer set repeats the labelled data",
        )


def _pickle_strings(data: bytes) -> set[str]:
    """The string constants of a pickle, read without running it (pickletools, not pickle)."""
    import pickletools

    out = set()
    for op, arg, _ in pickletools.genops(data):
        if isinstance(arg, str) and "UNICODE" in op.name:
            out.add(arg)
    return out


def check_resume(value) -> None:
    """``resume``: true, false, or the path of a Lightning checkpoint written by kdbench (a
    torch zip archive whose pickle holds ``state_dict`` and ``loops``, read without unpickling
    it), which loads with ``weights_only=True`` (as Lightning loads it: nothing in it runs).
    Only a checkpoint path imports torch here."""
    if value in (None, False, True):
        return
    if not isinstance(value, str):
        raise ConfigError("resume", value, "must be true, false or a checkpoint path")
    how = "give the last.ckpt in a run's checkpoints/ directory, or resume=true"
    path = os.path.expanduser(value)
    if not os.path.isfile(path):
        raise ConfigError("resume", value, f"no such file: {how}")
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            pkl = [n for n in z.namelist() if n.endswith("data.pkl")]
            if len(pkl) != 1 or z.getinfo(pkl[0]).file_size > 256 << 20:
                raise ValueError("no single data.pkl")
            strings = _pickle_strings(z.read(pkl[0]))
    except Exception:  # noqa: BLE001 - unreadable, not a zip, corrupt pickle: not a checkpoint
        strings = set()
    if not {"state_dict", "loops"} <= strings:
        raise ConfigError("resume", value, f"not a Lightning checkpoint written by kdbench: {how}")
    # What Lightning will do with it (torch.load, weights-only by default since torch 2.6), now
    # rather than after the data and the teacher: a file that needs arbitrary code is refused.
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the file's
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        if "weights only load failed" in first.lower():
            first = "it holds objects that would run code when loaded"
        raise ConfigError(
            "resume", value, f"cannot be loaded as a weights-only checkpoint ({first}): {how}"
        ) from None


SQLALCHEMY_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
# SQLAlchemy's database drivers: the module each imports (a dialect's default first)
DB_DRIVERS = {
    "postgresql": "psycopg2",
    "mysql": "MySQLdb",
    "mssql": "pyodbc",
    "psycopg2": "psycopg2",
    "psycopg": "psycopg",
    "pg8000": "pg8000",
    "asyncpg": "asyncpg",
    "mysqldb": "MySQLdb",
    "pymysql": "pymysql",
    "mysqlconnector": "mysql.connector",
    "pyodbc": "pyodbc",
    "pymssql": "pymssql",
}


def _check_driver(key: str, uri: str, env: str = "") -> None:
    """The database driver a ``dialect[+driver]://`` URL needs is installed (no connection)."""
    import importlib.util

    scheme = uri.split(":", 1)[0].lower()
    dialect, _, driver = scheme.partition("+")
    name = driver or dialect
    module = DB_DRIVERS.get(name)
    if module is None or dialect == "sqlite":
        return
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(
            key,
            uri,
            f"needs the database driver {module!r}, which is not installed: pip install it, or "
            f"name an installed one as {dialect}+<driver>://{env}",
        )


def check_tracking_uri(uri: str, key: str = "mlflow.tracking_uri") -> None:
    """Cheap checks (no connection, no network) that MLflow can use ``uri``: an SQLite file in
    an existing writable directory, a well-formed http(s) or database URL; MLflow 3 refuses
    the file store (``file:`` or a bare path) unless ``MLFLOW_ALLOW_FILE_STORE`` is set."""
    from urllib.parse import urlsplit

    uri = str(uri or "").strip() or "sqlite:///mlflow.db"  # kdbench.tracking's default
    env = " (from MLFLOW_TRACKING_URI)" if os.environ.get("MLFLOW_TRACKING_URI") == uri else ""
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    base = scheme.split("+", 1)[0]
    if base == "sqlite":
        rest = uri.split(":", 1)[1]
        if not rest.startswith("///"):
            raise ConfigError(key, uri, f"an SQLite store is sqlite:///<file>{env}")
        path = rest[3:].split("?", 1)[0]
        if path in ("", ":memory:"):
            raise ConfigError(key, uri, f"names no database file: sqlite:///mlflow.db{env}")
        if path.startswith("file:"):  # SQLite URI filename (?uri=true): left to SQLite
            return
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ConfigError(key, uri, f"the directory {folder} does not exist: create it{env}")
        if os.path.isdir(path):
            raise ConfigError(key, uri, f"{path} is a directory, not an SQLite file{env}")
        if os.path.exists(path):
            if not os.access(path, os.R_OK | os.W_OK):
                raise ConfigError(key, uri, f"{path} is not readable and writable{env}")
            try:
                with open(path, "rb") as f:
                    head = f.read(16)
            except OSError as exc:
                raise ConfigError(key, uri, f"cannot read {path}: {exc.strerror}{env}") from None
            if head and head != b"SQLite format 3\x00":
                raise ConfigError(
                    key, uri, f"{path} is not an SQLite database: name another file{env}"
                )
        elif not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(key, uri, f"the directory {folder} is not writable{env}")
        return
    if base in ("http", "https"):
        parts = urlsplit(uri)
        try:
            port_ok = parts.port is None or 0 < parts.port < 65536
        except ValueError:
            port_ok = False
        if not parts.hostname or not port_ok or " " in uri:
            raise ConfigError(key, uri, f"is not a well-formed {base} URL: http://host:5000{env}")
        return
    if base in SQLALCHEMY_SCHEMES or base == "databricks":
        if base != "databricks" and not urlsplit(uri).hostname:
            raise ConfigError(key, uri, f"names no database host: {base}://user:pw@host/db{env}")
        _check_driver(key, uri, env)
        return
    if base == "file" or not scheme or (len(scheme) == 1 and os.name == "nt"):
        allow = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower()
        if allow not in ("1", "true", "yes"):
            raise ConfigError(
                key,
                uri,
                "MLflow 3 refuses its file store (./mlruns, file:): use a database such as "
                f"sqlite:///mlflow.db (or set MLFLOW_ALLOW_FILE_STORE=true){env}",
            )
        return
    raise ConfigError(
        key,
        uri,
        f"unknown store scheme {scheme!r}: use sqlite:///mlflow.db, a database URL "
        f"(postgresql://, mysql://, mssql://) or an MLflow server (http://, https://){env}",
    )


TUNE_DIRECTIONS = ("maximize", "minimize")
TUNE_PRUNERS = ("median", "none")


def check_tune(cfg: DictConfig) -> None:
    """The ``tune`` group of ``python -m kdbench.tune`` (config only: before the study and its
    MLflow parent run exist)."""
    t = cfg.tune
    _positive_int("tune.n_trials", t.get("n_trials"))
    _int_at_least("tune.seed", t.get("seed"), 0)
    _int_at_least("tune.n_startup_trials", t.get("n_startup_trials"), 0)
    _positive_int("tune.heartbeat_s", t.get("heartbeat_s", 30))
    if t.get("direction") not in TUNE_DIRECTIONS:
        raise ConfigError("tune.direction", t.get("direction"), "must be maximize or minimize")
    pruner = t.get("pruner")
    if pruner is not None and str(pruner) not in TUNE_PRUNERS:
        raise ConfigError("tune.pruner", pruner, "must be median or none")
    storage = str(t.get("storage") or "").strip()
    scheme = storage.split(":", 1)[0].split("+", 1)[0].lower() if "://" in storage else ""
    if scheme not in SQLALCHEMY_SCHEMES:
        raise ConfigError(
            "tune.storage",
            storage,
            "must be an SQLAlchemy URL such as sqlite:///optuna.db or "
            "postgresql://user:password@host/db",
        )
    check_tracking_uri(storage, key="tune.storage")  # the same cheap checks as MLflow's store


def check_adversarial_datafree(cfg: DictConfig) -> None:
    """``method=adversarial``'s term options and ``scheme=datafree``'s options."""
    term = cfg.method.get("term")
    if term is not None and str(term.get("_target_", "")).endswith(".AdversarialTerm"):
        on = term.get("on", "logits")
        if on not in ("logits", "embedding"):
            raise ConfigError("method.term.on", on, "must be logits or embedding")
        hidden = term.get("hidden", [])
        ok = isinstance(hidden, ListConfig | list) and all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden
        )
        if not ok:
            raise ConfigError(
                "method.term.hidden", hidden, "must be a list of layer widths >= 1, e.g. [64, 64]"
            )
        if not isinstance(term.get("saturating", False), bool):
            raise ConfigError("method.term.saturating", term.saturating, "must be true or false")
        if term.get("optim") is None:
            raise ConfigError("method.term.optim", None, "the discriminator needs its optimizer")
        check_optim(term.optim, "method.term.optim")
    s = cfg.scheme
    if not str(s.get("_target_", "")).endswith("schemes.datafree.DataFree"):
        return
    m = cfg.method
    if m.alpha == 0 and (m.get("term") is None or m.beta == 0):  # labels alone (none)
        raise ConfigError(
            "method",
            m.name,
            "scheme=datafree trains on generated samples, which have no labels, and this "
            "method learns from labels alone: pick one that learns from the teacher "
            "(e.g. method=kd)",
        )
    for key in ("steps_per_epoch", "latent_dim"):
        _positive_int(f"scheme.{key}", s.get(key))
    _int_at_least("scheme.generator_width", s.get("generator_width", 128), 2)
    if s.get("batch_size") is not None:
        _positive_int("scheme.batch_size", s.batch_size)
    for key in ("one_hot", "activation", "entropy", "bn_weight"):
        _number(f"scheme.{key}", s.get(key), 0, strict=False)
    check_optim(s.generator_optim, "scheme.generator_optim")
    ref = s.get("reference") or {}
    none_acc, kd_acc = ref.get("none_acc"), ref.get("kd_acc")
    if (none_acc is None) != (kd_acc is None):
        raise ConfigError(
            "scheme.reference",
            {"none_acc": none_acc, "kd_acc": kd_acc},
            "give both none_acc and kd_acc (test accuracies in [0, 1]) or neither",
        )
    if none_acc is not None:
        _fraction("scheme.reference.none_acc", none_acc, "in [0, 1] (a test accuracy)")
        _fraction("scheme.reference.kd_acc", kd_acc, "in [0, 1] (a test accuracy)")
        if kd_acc <= none_acc:
            raise ConfigError(
                "scheme.reference.kd_acc",
                kd_acc,
                f"must exceed none_acc={none_acc}: recovered = (acc - none) / (kd - none)",
            )


ENSEMBLE_WEIGHTINGS = ("mean", "entropy", "ca_mkd")  # kdbench.teacher.EnsembleTeacher
PSKD_TARGETS = ("epoch", "last_batch")  # kdbench.schemes.pskd.PSKD
TFKD_FORMS = ("reference", "kd")  # kdbench.losses.tfkd_loss (that module needs torch)


def check_variants_self(cfg: DictConfig) -> None:
    """``teacher.weighting`` (``teacher=ensemble``), ``method=tfkd``'s term options and
    ``scheme=pskd``'s options."""
    weighting = cfg.teacher.get("weighting")
    if weighting is not None and weighting not in ENSEMBLE_WEIGHTINGS:
        raise ConfigError(
            "teacher.weighting",
            weighting,
            f"must be one of {', '.join(ENSEMBLE_WEIGHTINGS)} (per-sample weights of the "
            "ensemble's members: average, entropy-based, confidence-aware CA-MKD)",
        )
    term = cfg.method.get("term")
    if term is not None and str(term.get("_target_", "")).endswith(".TfKDTerm"):
        _fraction(
            "method.term.correct_prob",
            term.get("correct_prob"),
            "in (0, 1): the virtual teacher's probability of the true class, e.g. 0.99",
            high_open=True,
            low_open=True,
        )
        _number("method.term.temperature", term.get("temperature"), 0, strict=True)
        if term.get("form") not in TFKD_FORMS:
            raise ConfigError(
                "method.term.form",
                term.get("form"),
                "must be reference (the Tf-KD repository's loss) or kd (KD at T, METHODS.md)",
            )
    s = cfg.scheme
    if not str(s.get("_target_", "")).endswith("schemes.pskd.PSKD"):
        return
    if s.get("targets") not in PSKD_TARGETS:
        raise ConfigError(
            "scheme.targets",
            s.get("targets"),
            "must be epoch (PS-KD: each sample's prediction of the previous epoch) or "
            "last_batch (DLB: the previous step's samples again, taught by that step)",
        )
    _fraction("scheme.alpha_T", s.get("alpha_T"), "in [0, 1] (PS-KD's a_T: 0.8 in the paper)")


def check_config(cfg: DictConfig) -> None:
    """Every check that needs the config alone; raises :class:`ConfigError` (one line)."""
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError("seed", cfg.seed, "must be an integer >= 0")
    _positive_int("trainer.max_epochs", cfg.trainer.get("max_epochs"))
    _positive_int("teacher.epochs", cfg.teacher.get("epochs"))
    check_dataset(cfg.dataset)
    check_method(cfg.method)
    check_teacher_topk(cfg)
    check_teacher_checkpoint(cfg.teacher.get("checkpoint"))
    check_steps_per_call(cfg)
    check_optim(cfg.optim, "optim")
    check_optim(cfg.teacher.optim, "teacher.optim")
    check_resume(cfg.get("resume"))
    check_tracking_uri(cfg.mlflow.get("tracking_uri"))
    from kdbench.deploy import check_deploy  # torch-free: the form's options, the deploy extra

    check_deploy(cfg)
    check_model_config(cfg)  # teacher/student keys and specs (kdbench/modelspec.py)
    check_variants_self(cfg)  # teacher.weighting, method=tfkd, scheme=pskd
    check_adversarial_datafree(cfg)
