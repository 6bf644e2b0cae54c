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
python -m kdbench -m student=mlp method=crd,crd_kd method.term.nce_k=1024 "${common[@]}"
