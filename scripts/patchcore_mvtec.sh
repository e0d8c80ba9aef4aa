#!/usr/bin/env bash
# PatchCore on MVTec AD from the normal train images (the paper's reference run:
# WideResNet-50-2, layers 2+3, resize 256 / crop 224, coreset 10 %), then the usual table.
#   source env.sh && bash scripts/patchcore_mvtec.sh [extra test.py flags]
# Variables: WRN_WEIGHTS (default $CKPT_DIR/wide_resnet50_2-95faca4d.pth), CORESET (0.1),
# BANK_DIR (default $RESULTS_DIR/banks/patchcore_mvtec), DEVICE, BATCH_SIZE, RESULTS_DIR,
# VIZ_DIR, VIZ_LIMIT. FILO_CKPT=<filo checkpoint> adds FiLo's zero-shot maps (--fusion mean).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. ./env.sh  # idempotent: activates .venv, keeps variables the user set
# NPROC=N (and NNODES, RDZV_ENDPOINT for several machines) runs under torchrun
# shellcheck disable=SC1091
. "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
if ! python -m filo doctor --job memory-mvtec --data_path "$MVTEC_ROOT"; then
    echo "patchcore_mvtec.sh: fix the items above (python -m filo doctor explains each), then run again" >&2
    exit 1
fi
bank="${BANK_DIR:-$RESULTS_DIR/banks/patchcore_mvtec}"
filo=()
fusion=(--fusion memory)
if [ -n "${FILO_CKPT:-}" ]; then
    filo=(--ckpt_path "$FILO_CKPT")
    fusion=(--fusion mean)
fi
"${launch[@]}" -m filo.memory build --dataset mvtec --data_path "$MVTEC_ROOT" --out "$bank" \
    --backbone wrn50 --weights "${WRN_WEIGHTS:-$CKPT_DIR/wide_resnet50_2-95faca4d.pth}" \
    -p "${CORESET:-0.1}" --batch_size "${BATCH_SIZE:-8}" ${DEVICE:+--device "$DEVICE"} \
    ${filo[@]+"${filo[@]}"}
exec "${launch[@]}" test.py --dataset mvtec --data_path "$MVTEC_ROOT" --memory_bank "$bank" \
    ${filo[@]+"${filo[@]}"} "${fusion[@]}" --batch_size "${BATCH_SIZE:-8}" \
    --num_workers "${NUM_WORKERS:-2}" ${DEVICE:+--device "$DEVICE"} \
    --save_path "$RESULTS_DIR/patchcore_mvtec" --viz_dir "$VIZ_DIR/patchcore_mvtec" \
    --viz_limit "${VIZ_LIMIT:-20}" "$@"
