#!/usr/bin/env bash
# Shared body of test_mvtec.sh / test_visa.sh:  _run_test.sh TEST_DATASET TRAIN_DATASET [flags]
set -euo pipefail
test_ds="$1"; train_ds="$2"; shift 2
case "$test_ds" in
    mvtec) root="$MVTEC_ROOT"; default_root="$FILO_ROOT/data/mvtec_anomaly_detection" ;;
    visa)  root="$VISA_ROOT";  default_root="$FILO_ROOT/data/VisA_20220922" ;;
    *) echo "error: unknown dataset $test_ds" >&2; exit 2 ;;
esac
# Did the user point at anything? (env.sh's defaults are not a choice the user made.)
user_set=""
if [ "$root" != "$default_root" ] || [ "$CKPT_DIR" != "$FILO_ROOT/ckpt" ] \
        || [ -n "${FILO_CKPT:-}" ] || [ -n "${GROUNDING_CKPT:-}" ]; then
    user_set="yes"
fi
FILO_CKPT="${FILO_CKPT:-$CKPT_DIR/filo_train_on_${train_ds}.pth}"
GROUNDING_CKPT="${GROUNDING_CKPT:-$CKPT_DIR/grounding_train_on_${train_ds}.pth}"

if [ -z "$user_set" ] && [ ! -e "$root" ] && [ ! -e "$FILO_CKPT" ]; then
    exec python -m filo.demo --out "$RESULTS_DIR/demo" --viz_dir "$VIZ_DIR/demo"
fi

job="test-$test_ds"
[ "$test_ds" = "$train_ds" ] && job="test-${test_ds}-indomain"
if ! python -m filo doctor --job "$job" --ckpt_path "$FILO_CKPT" \
        --grounded_checkpoint "$GROUNDING_CKPT" --data_path "$root"; then
    echo "test_${test_ds}.sh: fix the items above (python -m filo doctor explains each), then run again" >&2
    exit 1
fi
# The published tables came from the research code: reproduce them with its rules (README,
# "Research-code differences"); RULES=fixed uses filo's corrected rules instead.
case "${RULES:-research}" in
    research) rules=(--legacy_box_slices --legacy_grid --legacy_text_threshold --legacy_phrase_case --legacy_macaroni) ;;
    fixed) rules=() ;;
    *) echo "error: RULES must be 'research' or 'fixed', got '${RULES}'" >&2; exit 2 ;;
esac
# NPROC=N (and NNODES, RDZV_ENDPOINT for several machines) runs under torchrun
# shellcheck disable=SC1091
. "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
exec "${launch[@]}" test.py --dataset "$test_ds" --data_path "$root" \
    --ckpt_path "$FILO_CKPT" --grounded_checkpoint "$GROUNDING_CKPT" \
    --box_threshold "${BOX_THRESHOLD:-0.25}" --text_threshold "${TEXT_THRESHOLD:-0.25}" \
    --area_threshold "${AREA_THRESHOLD:-0.7}" --batch_size "${BATCH_SIZE:-8}" \
    --num_workers "${NUM_WORKERS:-2}" ${DEVICE:+--device "$DEVICE"} \
    --save_path "$RESULTS_DIR/test_${test_ds}_from_${train_ds}" \
    --viz_dir "$VIZ_DIR/test_${test_ds}_from_${train_ds}" --viz_limit "${VIZ_LIMIT:-20}" ${rules[@]+"${rules[@]}"} "$@"
