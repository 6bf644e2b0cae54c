#!/usr/bin/env bash
# none, hard, kd, fitnet, at, rkd x 3 seeds on MNIST-1D (offline scheme, default teacher),
# for the MLP student (default; attention transfer does not apply to it) and the small CNN.
# Writes results/mnist1d_offline.md. About 10 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p outputs results
DB=outputs/mnist1d_offline.db
rm -f "$DB"
export MLFLOW_TRACKING_URI="sqlite:///$PWD/$DB"
common=(trainer.enable_progress_bar=false mlflow.experiment=mnist1d_offline)
python -m kdbench -m student=mlp method=none,hard,kd,fitnet,rkd seed=0,1,2 "${common[@]}"
python -m kdbench -m student=cnn1d_small method=none,hard,kd,fitnet,at,rkd seed=0,1,2 "${common[@]}"
{
  echo "# MNIST-1D, offline distillation, 3 seeds"
  echo
  echo "Produced by \`scripts/offline_grid.sh\` ($(date -u +%Y-%m-%d), $(nproc) CPU cores, kdbench $(git rev-parse --short HEAD 2>/dev/null || echo '?'))."
  echo "Defaults: 15 epochs, Adam lr 3e-3 cosine, batch 128, transfer set of 20000 unlabelled samples;"
  echo "each method at its reference weights (conf/method/). Test accuracy as mean ± std over seeds 0, 1, 2;"
  echo "'last' is the final epoch, 'best val' the epoch with the best validation accuracy."
  echo "\`at\` needs feature maps, so it runs on the CNN student only."
  echo
  python -m kdbench.leaderboard --experiment mnist1d_offline --markdown
} > results/mnist1d_offline.md
cat results/mnist1d_offline.md
