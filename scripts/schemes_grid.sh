#!/usr/bin/env bash
# Method x scheme on MNIST-1D, 3 seeds -> results/mnist1d_schemes.md.
# Pair: a 22.7k-parameter 1-D CNN teacher (channels 32-32-64-64, ~97%) and the MLP student, and a
# transfer set of 5000 (not 20000), so the online peers and born-again generations train in
# reasonable CPU time (about 40 minutes on 2 cores). Under scheme=self the student is the teacher's architecture (a CNN), so attention
# transfer runs there; the MLP has no feature maps, so it does not under offline/online.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p outputs results
DB=outputs/mnist1d_schemes.db
rm -f "$DB"
export MLFLOW_TRACKING_URI="sqlite:///$PWD/$DB"
common=(trainer.enable_progress_bar=false mlflow.experiment=mnist1d_schemes
        "teacher.kwargs.channels=[32,32,64,64]" dataset.transfer_size=5000)
python -m kdbench -m scheme=offline,online method=none,hard,kd,fitnet,rkd seed=0,1,2 "${common[@]}"
python -m kdbench -m scheme=self method=none,hard,kd,fitnet,at,rkd seed=0,1,2 "${common[@]}"
{
  echo "# MNIST-1D: every method under every scheme, 3 seeds"
  echo
  echo "Produced by \`scripts/schemes_grid.sh\` ($(date -u +%Y-%m-%d), $(nproc) CPU cores, kdbench $(git rev-parse --short HEAD 2>/dev/null || echo '?'))."
  echo "Teacher: cnn1d with channels 32-32-64-64 (22.7k parameters); student: mlp (15.2k) under offline"
  echo "and online, the teacher's architecture under self (3 generations, generation 0 = the teacher)."
  echo "15 epochs, Adam lr 3e-3 cosine, transfer set of 5000 unlabelled samples, reference weights."
  echo "Student test accuracy % (last epoch), mean ± std over seeds 0, 1, 2. Online: the student peer;"
  echo "self: the last generation."
  echo
  python -m kdbench.leaderboard --experiment mnist1d_schemes --pivot scheme
  echo
  echo "Other numbers of the same runs (ensembles, every peer and generation) are in the MLflow runs;"
  echo "the long table:"
  echo
  python -m kdbench.leaderboard --experiment mnist1d_schemes --markdown --no-mlflow
} > results/mnist1d_schemes.md
# the same runs as leaderboard files (markdown, CSV, Pareto plots)
python -m kdbench.leaderboard --experiment mnist1d_schemes --out-dir results/schemes --no-mlflow \
  > /dev/null
cat results/mnist1d_schemes.md
