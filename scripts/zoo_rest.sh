#!/usr/bin/env bash
# The three zoo rows that results/mnist1d_zoo.md lacks (its grid did not finish in the session that
# made it): crd_kd on the MLP student, nst and vid on the small CNN student; same recipe as
# scripts/zoo_grid.sh (offline, default teacher, 15 epochs, 3 seeds, CRD with 1024 negatives).
# Writes results/mnist1d_zoo_rest.md. About 30 minutes on 2 CPU cores.
# (scripts/zoo_grid.sh runs the whole zoo, these rows included, into one table.)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p outputs results
DB=outputs/mnist1d_zoo_rest.db
rm -f "$DB"
export MLFLOW_TRACKING_URI="sqlite:///$PWD/$DB"
common=(trainer.enable_progress_bar=false mlflow.experiment=mnist1d_zoo seed=0,1,2)
python -m kdbench -m student=cnn1d_small method=nst,vid "${common[@]}"
python -m kdbench -m student=mlp method=crd_kd method.term.nce_k=1024 "${common[@]}"
{
  echo "# MNIST-1D: the zoo rows missing from mnist1d_zoo.md (crd_kd, nst, vid), offline, 3 seeds"
  echo
  echo "Produced by \`scripts/zoo_rest.sh\` ($(date -u +%Y-%m-%d), $(nproc) CPU cores, kdbench $(git rev-parse --short HEAD 2>/dev/null || echo '?'))."
  echo "Same recipe as results/mnist1d_zoo.md: teacher cnn1d (88k parameters), 15 epochs, Adam lr 3e-3"
  echo "cosine, batch 128, transfer set of 20000, reference weights, CRD with 1024 negatives;"
  echo "nst and vid on the small CNN student (they need feature maps), crd_kd on the MLP."
  echo "Compare with the none/kd rows of the same student in results/mnist1d_offline.md."
  echo
  python -m kdbench.leaderboard --experiment mnist1d_zoo --markdown --no-mlflow
} > results/mnist1d_zoo_rest.md
cat results/mnist1d_zoo_rest.md
