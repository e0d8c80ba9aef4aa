#!/usr/bin/env bash
# Reproduce the MVTec AD table of the paper: FiLo + GroundingDINO trained on VisA, tested on MVTec AD.
#   source env.sh && bash scripts/test_mvtec.sh [extra test.py flags]
# Variables (set before running; paths default to env.sh's):
#   FILO_CKPT       FiLo checkpoint       (default $CKPT_DIR/filo_train_on_visa.pth)
#   GROUNDING_CKPT  GroundingDINO ckpt    (default $CKPT_DIR/grounding_train_on_visa.pth)
#   In-domain instead: FILO_CKPT=$CKPT_DIR/filo_train_on_mvtec.pth GROUNDING_CKPT=$CKPT_DIR/grounding_train_on_mvtec.pth
#   BOX_THRESHOLD TEXT_THRESHOLD AREA_THRESHOLD (0.25 0.25 0.7, the research code's), DEVICE,
#   BATCH_SIZE (8), NUM_WORKERS (2), VIZ_DIR, VIZ_LIMIT (panels per class, 20), RESULTS_DIR,
#   RULES (research: the research code's rules, as published; fixed: filo's corrected rules).
# With no paths set and neither the dataset nor the checkpoint at the default locations, this
# runs the embedded demo (python -m filo.demo) instead, so a fresh machine shows the pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. ./env.sh  # idempotent: activates .venv, keeps variables the user set
exec bash scripts/_run_test.sh mvtec visa "$@"
