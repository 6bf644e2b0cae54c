#!/usr/bin/env bash
# Reproduce the CIFAR-100 table of the CRD benchmark (/work/shared/REFERENCE_RESULTS.md): the 9
# teacher -> student pairs (conf/experiment/cifar100_*.yaml, the reference recipe: SGD, batch 64,
# 240 epochs, lr 0.05 or 0.01 for MobileNetV2/ShuffleNet students, lr x0.1 at 150/180/210, no
# validation split) x 10 methods x 3 seeds = 270 student runs, plus the 6 distinct teachers
# (resnet56, resnet110, resnet32x4, wrn_40_2, vgg13, resnet50), each trained once, 240 epochs.
#
# GPU time (an ESTIMATE, not a measurement; measure the seconds per epoch of your GPU first):
#   (270 student runs + 6 teachers) x 240 epochs x (seconds per epoch)
#   e.g. at 15 s/epoch (a guess for resnet32x4 -> resnet8x4 on one A100-class GPU) that is
#   276 x 240 x 15 s = 993,600 s, about 276 GPU-hours (11.5 GPU-days). Seconds per epoch differ
#   between pairs (resnet50 and vgg13 teachers cost more) and between methods (feature methods
#   and CRD run the teacher on every augmented batch, plus their own modules).
#
# Usage, from anywhere (it runs from the repository root, in kdbench's Python environment):
#   CIFAR_ROOT=~/data bash scripts/reproduce_cifar100.sh
#   CIFAR_ROOT=~/data PAIRS="cifar100_r32x4_r8x4" METHODS="none kd dkd" SEEDS="0" \
#     EXTRA="trainer.enable_progress_bar=false" bash scripts/reproduce_cifar100.sh
# Environment:
#   CIFAR_ROOT  (required) the extracted cifar-100-python folder or the folder that holds it
#               (https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz)
#   SEEDS       student seeds (default "0 1 2"; the teacher's seed is fixed: teacher.seed)
#   METHODS     default "none kd fitnet at rkd pkt crd crd_kd dist dkd" (conf/method/; add kd_ls
#               dkd_ls for logit standardisation). Per-pair method values of the reference
#               code come with the pair's preset (its recipe node: DKD's beta is 2 for
#               resnet56/110 teachers, 6 for vgg13 -> vgg8 and the wrn pairs, else 8).
#   PAIRS       experiment names (default: all 9, conf/experiment/)
#   MLFLOW_TRACKING_URI  default sqlite:///<repo>/outputs/cifar100.db (MLflow experiment cifar100)
#   EXTRA       extra Hydra overrides for every run, e.g. "trainer.devices=4 trainer.strategy=ddp_spawn".
#               Only overrides every method has: Hydra checks an override that is not swept
#               against the default method (kd), so method-specific keys fail here.
#               Multi-GPU: each process loads dataset.batch_size (64), so 4 devices train with
#               a total batch of 256; users of the reference code lose about 1 point that way
#               unless the learning rate is scaled linearly (optim.lr, teacher.optim.lr), and
#               the lr differs between pairs: give such PAIRS groups their own EXTRA.
#
# Step 1, the teachers: no separate step. Every run of the offline scheme (method=none too)
# resolves its teacher first: the first run of a pair trains the teacher (240 epochs) and caches
# it under cache_dir/teachers (KDBENCH_CACHE_DIR, default ~/.cache/kdbench), keyed by everything
# that determines it; every later run of that pair, and of the other pairs with the same teacher
# (resnet32x4: 3 pairs, wrn_40_2: 2 pairs), loads it. To use your own weights instead, add
# teacher.checkpoint=PATH (a state dict of that architecture) for that pair (PAIRS=... EXTRA=...).
# Running pairs in parallel (one GPU each: CUDA_VISIBLE_DEVICES, PAIRS): let the shared teachers
# be cached first, or each process trains its own copy.
# Step 2: one Hydra multirun sweep per pair over METHODS x SEEDS (runs one after another).
# Step 3: the leaderboard, methods as rows and one column per pair (each pair has its own
# student), mean ± std of the last-epoch test accuracy; all columns in outputs/cifar100_leaderboard.
set -euo pipefail

url=https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz
if [[ -z "${CIFAR_ROOT:-}" ]] || [[ ! -d "$CIFAR_ROOT" ]]; then
  echo "reproduce_cifar100.sh: set CIFAR_ROOT to a folder with the extracted cifar-100-python ($url)" >&2
  exit 2
fi
CIFAR_ROOT=$(cd "$CIFAR_ROOT" && pwd)  # absolute: the script changes directory
if [[ ! -f "$CIFAR_ROOT/cifar-100-python/train" && ! -f "$CIFAR_ROOT/train" ]]; then
  echo "reproduce_cifar100.sh: no cifar-100-python/train under CIFAR_ROOT=$CIFAR_ROOT: extract $url there" >&2
  exit 2
fi

cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"0 1 2"}
METHODS=${METHODS:-"none kd fitnet at rkd pkt crd crd_kd dist dkd"}
PAIRS=${PAIRS:-"cifar100_r56_r20 cifar100_r110_r32 cifar100_r32x4_r8x4 cifar100_wrn40_2_wrn16_2 cifar100_wrn40_2_wrn40_1 cifar100_vgg13_vgg8 cifar100_r32x4_shv1 cifar100_r32x4_shv2 cifar100_res50_mv2"}
read -r -a extra <<< "${EXTRA:-}"

join() { local IFS=,; echo "$*"; }
# shellcheck disable=SC2086  # word splitting of the space-separated lists is intended
methods=$(join $METHODS)
# shellcheck disable=SC2086
seeds=$(join $SEEDS)
for pair in $PAIRS; do  # fail on a typo before hours of training
  [[ -f "conf/experiment/$pair.yaml" ]] || { echo "reproduce_cifar100.sh: no conf/experiment/$pair.yaml" >&2; exit 2; }
done
for m in $METHODS; do
  [[ -f "conf/method/$m.yaml" ]] || { echo "reproduce_cifar100.sh: no conf/method/$m.yaml" >&2; exit 2; }
done
if [[ -z "${MLFLOW_TRACKING_URI:-}" ]]; then
  mkdir -p outputs
  MLFLOW_TRACKING_URI="sqlite:///$PWD/outputs/cifar100.db"
fi
export MLFLOW_TRACKING_URI

for pair in $PAIRS; do
  echo "== $pair: method=$methods seed=$seeds (MLflow: $MLFLOW_TRACKING_URI)"
  python -m kdbench -m "experiment=$pair" "method=$methods" "seed=$seeds" \
    "dataset.root='$CIFAR_ROOT'" ${extra[@]+"${extra[@]}"}
done

python -m kdbench.leaderboard --tracking-uri "$MLFLOW_TRACKING_URI" --experiment cifar100 \
  --dataset cifar100 --scheme offline --pivot student --out-dir outputs/cifar100_leaderboard
