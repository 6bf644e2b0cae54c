#!/usr/bin/env bash
# Text distillation (issue #13), 3 seeds, the presets' own settings:
# - shakespeare_char (gpt_small -> gpt_tiny): every token-level method x offline, seqkd, onpolicy,
#   beside none (the student alone, offline) and none under seqkd (pure Seq-KD: CE on the
#   teacher's text) -> results/text_shakespeare.md
# - arithmetic (gpt_small -> gpt_tiny): none vs token-level kd vs seqkd (with and without kd)
#   -> results/text_arithmetic.md
# The leaderboard files go to results/text/. About an hour on 2 CPU cores.
#   SEEDS=0 EPOCHS=1 bash scripts/text_grid.sh    # a smoke run of the same grid
#   EPOCHS=3 bash scripts/text_grid.sh             # the presets' own epochs (shakespeare_char)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p outputs results/text
SEEDS=${SEEDS:-0,1,2}
export KDBENCH_PROGRESS=${KDBENCH_PROGRESS:-none}
# shakespeare_char: 2 student epochs (the preset trains 3), so its 78 runs fit in about an hour
# on 2 cores; arithmetic: the preset's 4 epochs. EPOCHS=N sets both. ONLY=shakespeare|arithmetic
# runs one part.
epochs=(trainer.max_epochs="${EPOCHS:-2}")
arith_epochs=(trainer.max_epochs="${EPOCHS:-4}")
ONLY=${ONLY:-all}
METHODS=kd,reverse_kd,jsd,skew_kl,skew_reverse_kl,tvd,hidden_cos,minilm
# lighter efficiency measurements than the default (1024-batch throughput, 30 latency runs)
light=(efficiency.throughput_batch=256 efficiency.latency_runs=10)

fresh_store() {  # a new MLflow store outputs/<experiment>.db for this part of the grid
  rm -f "outputs/$1.db"
  export MLFLOW_TRACKING_URI="sqlite:///$PWD/outputs/$1.db"
}

# -- shakespeare_char -------------------------------------------------------------------------
if [ "$ONLY" != arithmetic ]; then
EXP=text_shakespeare
fresh_store $EXP
common=(experiment=shakespeare_char mlflow.experiment=$EXP seed="$SEEDS" "${epochs[@]}" "${light[@]}")
python -m kdbench -m method=none scheme=offline,seqkd "${common[@]}"
python -m kdbench -m method=$METHODS scheme=offline,seqkd,onpolicy "${common[@]}"
{
  echo "# Shakespeare, character level: every token-level method under offline, seqkd and onpolicy"
  echo
  echo "Produced by \`bash scripts/text_grid.sh\` ($(date -u +%Y-%m-%d), $(nproc) CPU cores, kdbench $(git rev-parse --short HEAD 2>/dev/null || echo '?'))."
  echo "\`experiment=shakespeare_char\` as shipped: windows of 64 characters of 28 training plays"
  echo "(6000 labelled + 6000 unlabelled transfer windows of 4 other plays), tested on 600 windows of"
  echo "4 held-out plays; teacher gpt_small (812k parameters, trained once, 6 epochs), student"
  echo "gpt_tiny (64k), ${EPOCHS:-2} epochs (the preset: 3), Adam lr 3e-3 cosine, T = 1, each method's default weights"
  echo "(conf/method/). Seeds: $SEEDS."
  echo "Rows: scheme=seqkd trains on the teacher's sampled continuations of the first 32 characters"
  echo "of each window (method=none there: pure Seq-KD, CE on the teacher's text); scheme=onpolicy"
  echo "samples half of the batches from the student (lmbda 0.5, temperature 0.9) and distils the"
  echo "teacher's scores of them."
  echo "**test bpc** (bits per character, lower is better) is the headline column; \"test acc\" is"
  echo "next-character accuracy, agreement the top-1 token agreement with the teacher, tokens/s the"
  echo "student's sampling speed at batch 1."
  echo
  python -m kdbench.leaderboard --experiment "$EXP" --markdown --no-mlflow
} > "results/$EXP.md"
python -m kdbench.leaderboard --experiment "$EXP" --out-dir "results/text/shakespeare" --no-mlflow > /dev/null
fi

# -- arithmetic -------------------------------------------------------------------------------
if [ "$ONLY" != shakespeare ]; then
EXP=text_arithmetic
fresh_store $EXP
common=(experiment=arithmetic mlflow.experiment=$EXP seed="$SEEDS" "${arith_epochs[@]}" "${light[@]}")
python -m kdbench -m method=none,kd scheme=offline,seqkd "${common[@]}"
{
  echo "# Arithmetic with worked answers: sequence-level KD vs token-level KD vs none"
  echo
  echo "Produced by \`bash scripts/text_grid.sh\` ($(date -u +%Y-%m-%d), $(nproc) CPU cores, kdbench $(git rev-parse --short HEAD 2>/dev/null || echo '?'))."
  echo "\`experiment=arithmetic\` as shipped: 3-digit additions with step-by-step answers, 5700"
  echo "training / 300 validation / 500 test problems; teacher gpt_small, student gpt_tiny, ${EPOCHS:-4} epochs (the preset's),"
  echo "T = 1. Seeds: $SEEDS. Rows: offline none = the student alone on the gold traces; offline kd ="
  echo "token-level KD on the gold traces; seqkd none = Seq-KD (CE on the teacher's greedy traces);"
  echo "seqkd kd = Seq-KD + token-level KD on the teacher's traces."
  echo "**exact match %** (the final answer of a greedy generation) is the headline column."
  echo
  python -m kdbench.leaderboard --experiment "$EXP" --markdown --no-mlflow
} > "results/$EXP.md"
python -m kdbench.leaderboard --experiment "$EXP" --out-dir "results/text/arithmetic" --no-mlflow > /dev/null
fi
cat results/text_*.md
