#!/usr/bin/env bash
# GroundingDINO alone (no FiLo maps): image-level metrics from the best box score, boxes as JSON,
# and (MVTec and VisA have masks) COCO box AP of the kept boxes against one box per connected
# mask region (--coco_eval: coco_eval.csv, the "coco" key of results.json and coco_gt.json in
# the results folder, $RESULTS_DIR/detect_$DATASET).
#   source env.sh && bash scripts/gdino_only.sh [extra python -m filo.detect flags]
# Variables: DATASET (mvtec | visa | mpdd | btad | mvtec_ad2 | realiad, default mvtec), GROUNDING_CKPT (default: the detector
# fine-tuned on the other dataset; the public $CKPT_DIR/groundingdino_swint_ogc.pth works too),
# BOX_THRESHOLD TEXT_THRESHOLD AREA_THRESHOLD, DEVICE, BATCH_SIZE, RESULTS_DIR, VIZ_DIR, VIZ_LIMIT.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. ./env.sh  # idempotent: activates .venv, keeps variables the user set
DATASET="${DATASET:-mvtec}"
case "$DATASET" in
    mvtec) root="$MVTEC_ROOT"; other=visa; job=gdino-only ;;
    visa)  root="$VISA_ROOT";  other=mvtec; job=gdino-only-visa ;;
    mpdd)  root="$MPDD_ROOT";  other=mvtec; job=gdino-only-mpdd ;;
    btad)  root="$BTAD_ROOT";  other=mvtec; job=gdino-only-btad ;;
    mvtec_ad2) root="$MVTEC_AD2_ROOT"; other=mvtec; job=gdino-only-mvtec-ad2 ;;
    realiad) root="$REALIAD_ROOT"; other=mvtec; job=gdino-only-realiad ;;
    *) echo "error: DATASET must be mvtec, visa, mpdd, btad, mvtec_ad2 or realiad, got $DATASET" >&2; exit 2 ;;
esac
GROUNDING_CKPT="${GROUNDING_CKPT:-$CKPT_DIR/grounding_train_on_${other}.pth}"
if ! python -m filo doctor --job "$job" --grounded_checkpoint "$GROUNDING_CKPT" --data_path "$root"; then
    echo "gdino_only.sh: fix the items above, then run again" >&2
    exit 1
fi
out="$RESULTS_DIR/gdino_only_${DATASET}"
# NPROC=N (and NNODES, RDZV_ENDPOINT for several machines) runs under torchrun
# shellcheck disable=SC1091
. "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
exec "${launch[@]}" -m filo.detect --dataset "$DATASET" --data_path "$root" \
    --grounded_checkpoint "$GROUNDING_CKPT" \
    --box_threshold "${BOX_THRESHOLD:-0.25}" --text_threshold "${TEXT_THRESHOLD:-0.25}" \
    --area_threshold "${AREA_THRESHOLD:-0.7}" --batch_size "${BATCH_SIZE:-8}" \
    ${DEVICE:+--device "$DEVICE"} --save_boxes "$out/boxes" --save_coco "$out/detections_coco.json" \
    --pixel_metrics --coco_eval --viz_dir "$VIZ_DIR/gdino_only_${DATASET}" --viz_limit "${VIZ_LIMIT:-20}" "$@"
