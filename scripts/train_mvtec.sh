#!/usr/bin/env bash
# Train FiLo on the full test split of MVTec AD (the auxiliary dataset for testing on visa).
#   source env.sh && bash scripts/train_mvtec.sh [extra train.py flags, e.g. --epochs 15 --amp]
# Paths come from env.sh: MVTEC_ROOT (data), CKPT_DIR, FILO_CLIP_WEIGHTS (default
# $CKPT_DIR/ViT-L-14-336px.pt). The checkpoint goes to $SAVE_DIR/filo_train_on_mvtec.pth with
# SAVE_DIR defaulting to $CKPT_DIR/trained, so the released ckpt/filo_train_on_mvtec.pth is never
# overwritten; set SAVE_DIR (or pass --save_dir) to choose another folder. After an interruption,
# run the same command with --resume.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. ./env.sh  # idempotent: activates .venv, keeps variables the user set
export FILO_CLIP_WEIGHTS="${FILO_CLIP_WEIGHTS:-$CKPT_DIR/ViT-L-14-336px.pt}"
SAVE_DIR="${SAVE_DIR:-$CKPT_DIR/trained}"

if ! python -m filo doctor --job train-mvtec; then
    echo "train_mvtec.sh: the assets above are missing; fix them and run again" >&2
    exit 1
fi
echo "train_mvtec.sh: writing $SAVE_DIR/filo_train_on_mvtec.pth"
python train.py --dataset mvtec --data_path "$MVTEC_ROOT" --save_dir "$SAVE_DIR" \
    --clip_weights "$FILO_CLIP_WEIGHTS" "$@"
