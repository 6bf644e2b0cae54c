#!/usr/bin/env bash
# The methods of the zoo beyond the core six, on MNIST-1D (offline, default teacher), 3 seeds.
# MLP student (default): reverse_kd, dist, dkd, pkt, crd, crd_kd; the small CNN student: the
# methods that need stage outputs (sp, nst, vid). Together with the core methods' runs of
# scripts/offline_grid.sh they make results/mnist1d_zoo.md (python -m kdbench.leaderboard over both).
# CRD runs with 1024 negatives here (16384 is the reference; on 2 CPU cores the reference reads
# ~1 GB of memory bank per step and side). About 25 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p outputs results
DB=outputs/mnist1d_zoo.db
rm -f "$DB"
export MLFLOW_TRACKING_URI="sqlite:///$PWD/$DB"
common=(trainer.enable_progress_bar=false mlflow.experiment=mnist1d_zoo seed=0,1,2)
python -m kdbench -m student=mlp method=reverse_kd,dist,dkd,pkt "${common[@]}"
python -m kdbench -m student=cnn1d_small method=sp,nst,vid "${common[@]}"
# (one sweep per method: Hydra checks a non-swept override such as method.term.nce_k against the
# default method, kd, which has no term)
python -m kdbench -m student=mlp method=crd method.term.nce_k=1024 "${common[@]}"
python -m kdbench -m student=mlp method=crd_kd method.term.nce_k=1024 "${common[@]}"
# the zoo's table: these runs and the core methods' runs of scripts/offline_grid.sh
OFF=outputs/mnist1d_offline.db
[ -f "$OFF" ] || bash scripts/offline_grid.sh
{
  echo "# MNIST-1D: the method zoo, offline, 3 seeds"
  echo
  echo "Produced by \`scripts/offline_grid.sh\` and \`scripts/zoo_grid.sh\` ($(date -u +%Y-%m-%d), $(nproc) CPU cores, kdbench $(git rev-parse --short HEAD 2>/dev/null || echo '?'))."
  echo "Teacher cnn1d (88k parameters); 15 epochs, Adam lr 3e-3 cosine, batch 128, transfer set of 20000"
  echo "unlabelled samples; each method at its reference weights (conf/method/), except CRD with 1024"
  echo "negatives. DKD keeps its reference 20-epoch warm-up, so in 15 epochs its weight reaches 0.75."
  echo "Methods that need feature maps (at, sp, nst, vid) run on the small CNN student only."
  echo "Test accuracy mean ± std over seeds 0, 1, 2. Same rows with every column: leaderboard.md/.csv."
  echo
  python -m kdbench.leaderboard --tracking-uri "sqlite:///$PWD/$OFF" --tracking-uri "$MLFLOW_TRACKING_URI" \
    --experiment mnist1d_offline,mnist1d_zoo --markdown --out-dir results
} > results/mnist1d_zoo.md
cat results/mnist1d_zoo.md
