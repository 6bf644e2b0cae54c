"""Addition with worked step-by-step answers, generated in-process (``dataset=arithmetic``).

The small-scale version of distilling a teacher's reasoning traces. A problem adds two
``digits``-digit numbers (operands in ``[10^(d-1), 10^d - 1]``, so every prompt has the same
length ``P = 2d + 2``); the answer works it out digit by digit from the right, with the carry,
then gives the sum after a ``:``, then the end token ``\\n``::

    prompt  "347+586="
    answer  "7+6=13,4+8+1=13,3+5+1=9:933\\n"

A step is ``a+b=s`` or, with a carry in, ``a+b+1=s``; steps are separated by ``,``. The final
answer is the text after the last ``:`` or ``=`` (:meth:`Arithmetic.final_answer`), so a model
that answers directly (``347+586=933``) is scored the same way. Vocabulary: padding, ``\\n``,
``+``, ``,``, the digits, ``:``, ``=``.

A sequence is prompt + answer + end token, right-padded with id 0 to ``S = P + 10d`` tokens
(``10d`` is the longest answer with its end token); ``x = seq[:-1]``, ``y = seq[1:]``, and ``y``
is -2 (``PAD_LABEL``) where the target is a prompt token or padding: only the answer and the end
token are learned and distilled (completion-only). Problems are distinct across the test,
training and transfer sets (drawn in that order from one seeded stream, so ``transfer_size``
does not change the others); ``val_size`` problems are carved out of the training ones by the
base class. Transfer problems carry ``y = -1`` (UNLABELLED) on the answer, -2 elsewhere.
"""

from __future__ import annotations

import numpy as np
import torch

from kdbench.data.base import PAD_LABEL, UNLABELLED
from kdbench.data.text import PAD, TextDataModule
from kdbench.errors import ConfigError

FORMAT = 1  # the answer format's version: part of the cache key
EOS = "\n"
VOCAB = [PAD, *sorted("0123456789+=,:" + EOS)]


def worked_answer(a: int, b: int) -> str:
    """The worked answer to ``a+b`` (without the end token), e.g. ``7+6=13,4+8+1=13,3+5+1=9:933``
    for 347 + 586 (digits from the right; ``+1`` where a carry comes in)."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}" + ("+1" if carry else "") + f"={s}")
        carry = s // 10
    return ",".join(steps) + f":{a + b}"


def final_answer(text: str) -> str:
    """The final answer in a generated text: what follows the last ``:`` or ``=`` (before the
    end token, if any), stripped of blanks; ``""`` when there is neither."""
    text = text.split(EOS, 1)[0]
    cut = max(text.rfind(":"), text.rfind("="))
    return text[cut + 1 :].strip() if cut >= 0 else ""


class Arithmetic(TextDataModule):
    """``digits``-digit additions with worked answers (see the module docstring).

    ``train_size`` training problems (``val_size`` of them become the validation set),
    ``test_size`` test problems, ``transfer_size`` unlabelled transfer problems; ``seed`` seeds
    the draw. For exact-match scoring and sequence-level KD: :meth:`prompts`, :meth:`answers`,
    :meth:`final_answer`, :attr:`eos_id`, :attr:`prompt_len`, :attr:`max_answer_len`.
    """

    task = "lm"
    has_generator = True  # transfer problems: any number, distinct from the others

    def __init__(
        self,
        digits: int = 3,
        train_size: int = 6000,
        test_size: int = 500,
        seed: int = 0,
        **kwargs,
    ) -> None:
        for key, value, low in (("digits", digits, 1), ("train_size", train_size, 2)):
            if isinstance(value, bool) or int(value) != value or int(value) < low:
                raise ConfigError(f"dataset.{key}", value, f"must be an integer >= {low}")
        if isinstance(test_size, bool) or int(test_size) != test_size or int(test_size) < 1:
            raise ConfigError("dataset.test_size", test_size, "must be an integer >= 1")
        if int(digits) > 9:
            raise ConfigError("dataset.digits", digits, "must be at most 9")
        super().__init__(
            digits=int(digits),
            train_size=int(train_size),
            test_size=int(test_size),
            seed=int(seed),
            **kwargs,
        )
        d = int(digits)
        space = (9 * 10 ** (d - 1)) ** 2
        total = self.generation["train_size"] + self.generation["test_size"] + self.transfer_size
        if total > space // 2:  # distinct problems, drawn without a costly tail
            raise ConfigError(
                "dataset.digits",
                digits,
                f"has {space} distinct problems; train_size + test_size + transfer_size = "
                f"{total} needs at most half of them: use more digits or fewer problems",
            )

    # -- shapes and vocabulary --------------------------------------------------------------
    @property
    def vocab(self) -> list[str]:
        return list(VOCAB)

    @property
    def eos_id(self) -> int:
        return VOCAB.index(EOS)

    @property
    def prompt_len(self) -> int:
        """P: the tokens of every prompt (``a+b=``)."""
        return 2 * int(self.generation["digits"]) + 2

    @property
    def max_answer_len(self) -> int:
        """Tokens after the prompt, end token included, of the longest answer (``10d``)."""
        return 10 * int(self.generation["digits"])

    @property
    def seq_len(self) -> int:
        """S: prompt + longest answer + end token; a sample's x and y have S - 1 tokens."""
        return self.prompt_len + self.max_answer_len

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.seq_len - 1,)

    @staticmethod
    def final_answer(text: str) -> str:
        """The final answer of a generated text (after the last ``:`` or ``=``)."""
        return final_answer(text)

    # -- problems ---------------------------------------------------------------------------
    def _problems(self) -> np.ndarray:
        """Distinct ``(a, b)`` rows: test, then train, then transfer problems."""
        g = self.generation
        d = g["digits"]
        low, high = 10 ** (d - 1), 10**d  # operands in [low, high)
        need = g["test_size"] + g["train_size"] + self.transfer_size
        rng = np.random.default_rng(g["seed"])
        seen: set[int] = set()
        out: list[int] = []
        while len(out) < need:  # fixed-size chunks: the first problems never depend on `need`
            chunk = rng.integers(low, high, size=(4096, 2), dtype=np.int64)
            for code in (chunk[:, 0] * high + chunk[:, 1]).tolist():
                if code not in seen:
                    seen.add(code)
                    out.append(code)
        codes = np.asarray(out[:need], dtype=np.int64)
        return np.stack([codes // high, codes % high], axis=1)

    def _sequences(self, problems: np.ndarray) -> np.ndarray:
        """Rows of S ids: prompt, worked answer, end token, padding."""
        index = {ch: i for i, ch in enumerate(VOCAB)}
        seqs = np.zeros((len(problems), self.seq_len), dtype=np.uint8)
        for r, (a, b) in enumerate(problems.tolist()):
            ids = [index[ch] for ch in f"{a}+{b}={worked_answer(a, b)}{EOS}"]
            seqs[r, : len(ids)] = ids
        return seqs

    def _labels(self, seqs: np.ndarray, code: int | None = None) -> np.ndarray:
        """y = seq[1:] with PAD_LABEL on prompt targets and padding; ``code`` (if given)
        replaces the answer targets (UNLABELLED for transfer problems)."""
        y = seqs[:, 1:].astype(np.int16)
        answer = y != 0
        answer[:, : self.prompt_len - 1] = False  # targets that are prompt tokens
        y[~answer] = PAD_LABEL
        if code is not None:
            y[answer] = code
        return y

    def _make(self) -> dict[str, np.ndarray]:
        g = self.generation
        problems = self._problems()
        n_test, n_train = g["test_size"], g["train_size"]
        out = {}
        parts = {
            "_test": problems[:n_test],
            "": problems[n_test : n_test + n_train],
            "_transfer": problems[n_test + n_train :],
        }
        for suffix, rows in parts.items():
            if suffix == "_transfer" and not len(rows):
                continue
            seqs = self._sequences(rows)
            out[f"x{suffix}"] = seqs[:, :-1]
            code = UNLABELLED if suffix == "_transfer" else None
            out[f"y{suffix}"] = self._labels(seqs, code)
        return out

    def generate(self) -> dict[str, np.ndarray]:
        what = {
            "set": "arithmetic",
            "format": FORMAT,
            "transfer_size": self.transfer_size,
            **self.generation,
        }
        return self.load_cached(what, self._make)

    # -- prompts and answers, for exact match and sequence-level KD -------------------------
    def _split_x(self, split: str) -> torch.Tensor:
        self.setup()
        xs = {
            "train": self.train_x,
            "val": self.val_x,
            "test": self.test_x,
            "transfer": self.transfer_x,
        }
        if split not in xs:
            raise ValueError(f"split must be one of {sorted(xs)}, not {split!r}")
        return xs[split]

    def prompts(self, split: str) -> torch.Tensor:
        """The prompts of ``split`` (train, val, test or transfer) as a LongTensor ``[N, P]``,
        row i the prompt of sample i of that split (the order of ``train_x`` etc.)."""
        return self._split_x(split)[:, : self.prompt_len].long()

    def operands(self, split: str) -> np.ndarray:
        """``[N, 2]`` int64: the two numbers of every problem of ``split``, read off its prompt."""
        d = int(self.generation["digits"])
        digits = self.prompts(split).numpy() - VOCAB.index("0")  # ids of "0".."9" consecutive
        place = 10 ** np.arange(d - 1, -1, -1)
        return np.stack([digits[:, :d] @ place, digits[:, d + 1 : 2 * d + 1] @ place], axis=1)

    def answers(self, split: str) -> list[str]:
        """The gold worked answers of ``split`` (final answer included, end token not)."""
        return [worked_answer(a, b) for a, b in self.operands(split).tolist()]
