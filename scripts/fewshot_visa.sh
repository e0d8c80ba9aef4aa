#!/usr/bin/env bash
# K-shot on VisA: a memory bank from K normal images per class (seeded choice, leave-one-out
# calibration) fused with zero-shot FiLo (the MVTec-trained checkpoint) and its boxes.
#   source env.sh && bash scripts/fewshot_visa.sh [extra test.py flags]
# Variables: SHOTS (4; 1 and 2 as in the few-shot literature), SEED (0), FILO_CKPT (default
# $CKPT_DIR/filo_train_on_mvtec.pth), GROUNDING_CKPT ($CKPT_DIR/grounding_train_on_mvtec.pth),
# FUSION (mean | max | memory | filo, default mean), WRN_WEIGHTS, DEVICE, BATCH_SIZE,
# RESULTS_DIR, VIZ_DIR, VIZ_LIMIT.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. ./env.sh  # idempotent: activates .venv, keeps variables the user set
# NPROC=N (and NNODES, RDZV_ENDPOINT for several machines) runs under torchrun
# shellcheck disable=SC1091
. "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
FILO_CKPT="${FILO_CKPT:-$CKPT_DIR/filo_train_on_mvtec.pth}"
GROUNDING_CKPT="${GROUNDING_CKPT:-$CKPT_DIR/grounding_train_on_mvtec.pth}"
shots="${SHOTS:-4}"
if ! python -m filo doctor --job memory-visa --data_path "$VISA_ROOT" \
        || ! python -m filo doctor --job test-visa --ckpt_path "$FILO_CKPT" \
             --grounded_checkpoint "$GROUNDING_CKPT" --data_path "$VISA_ROOT"; then
    echo "fewshot_visa.sh: fix the items above (python -m filo doctor explains each), then run again" >&2
    exit 1
fi
bank="${BANK_DIR:-$RESULTS_DIR/banks/visa_${shots}shot_seed${SEED:-0}}"
"${launch[@]}" -m filo.memory build --dataset visa --data_path "$VISA_ROOT" --out "$bank" \
    --backbone wrn50 --weights "${WRN_WEIGHTS:-$CKPT_DIR/wide_resnet50_2-95faca4d.pth}" \
    --shots "$shots" --seed "${SEED:-0}" --ckpt_path "$FILO_CKPT" \
    --batch_size "${BATCH_SIZE:-8}" ${DEVICE:+--device "$DEVICE"}
exec "${launch[@]}" test.py --dataset visa --data_path "$VISA_ROOT" --ckpt_path "$FILO_CKPT" \
    --grounded_checkpoint "$GROUNDING_CKPT" --memory_bank "$bank" --fusion "${FUSION:-mean}" \
    --batch_size "${BATCH_SIZE:-8}" --num_workers "${NUM_WORKERS:-2}" ${DEVICE:+--device "$DEVICE"} \
    --save_path "$RESULTS_DIR/fewshot_visa_${shots}shot" \
    --viz_dir "$VIZ_DIR/fewshot_visa_${shots}shot" --viz_limit "${VIZ_LIMIT:-20}" "$@"
