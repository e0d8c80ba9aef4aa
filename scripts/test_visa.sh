#!/usr/bin/env bash
# Reproduce the VisA table of the paper: FiLo + GroundingDINO trained on MVTec AD, tested on VisA.
#   source env.sh && bash scripts/test_visa.sh [extra test.py flags]
# Variables as in scripts/test_mvtec.sh; checkpoints default to the MVTec-trained ones
# ($CKPT_DIR/filo_train_on_mvtec.pth, $CKPT_DIR/grounding_train_on_mvtec.pth).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. ./env.sh  # idempotent: activates .venv, keeps variables the user set
exec bash scripts/_run_test.sh visa mvtec "$@"
