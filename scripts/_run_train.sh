#!/usr/bin/env bash
# Shared body of train_mvtec.sh / train_visa.sh:  _run_train.sh DATASET [train.py flags]
set -euo pipefail
ds="$1"; shift
case "$ds" in
    mvtec) root="$MVTEC_ROOT" ;;
    visa)  root="$VISA_ROOT" ;;
    *) echo "error: unknown dataset $ds" >&2; exit 2 ;;
esac
export FILO_CLIP_WEIGHTS="${FILO_CLIP_WEIGHTS:-$CKPT_DIR/ViT-L-14-336px.pt}"
SAVE_DIR="${SAVE_DIR:-$CKPT_DIR/trained}"
if ! python -m filo doctor --job "train-$ds" --data_path "$root"; then
    echo "train_${ds}.sh: the assets above are missing; fix them and run again" >&2
    exit 1
fi
echo "train_${ds}.sh: writing $SAVE_DIR/filo_train_on_${ds}.pth"
exec python train.py --dataset "$ds" --data_path "$root" --save_dir "$SAVE_DIR" \
    --clip_weights "$FILO_CLIP_WEIGHTS" "$@"
