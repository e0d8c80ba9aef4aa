#!/usr/bin/env bash
# One table and one plot of every method on one split: zero-shot FiLo, FiLo + GroundingDINO
# boxes, k-shot and full-shot memory banks, and trained anomalib models (image/pixel AUROC,
# AP, AUPRO, train time, ms/image, peak RSS). Works on the demo's data:
#   python -m filo.demo --out outputs/demo --epochs 1 --no_banner
#   bash scripts/compare_methods.sh [extra benchmarks/compare_methods.py flags]
# Variables: DEMO_DIR (outputs/demo), OUT (outputs/compare_methods), MODELS (padim,fastflow),
# EPOCHS (1), SHOTS (2), DEVICE (cpu). Without a demo folder pass --data_path etc. yourself.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python}"
demo=()
if [ -d "${DEMO_DIR:-outputs/demo}" ]; then
    demo=(--demo "${DEMO_DIR:-outputs/demo}")
fi
exec "$py" benchmarks/compare_methods.py ${demo[@]+"${demo[@]}"} \
    --out "${OUT:-outputs/compare_methods}" --models "${MODELS:-padim,fastflow}" \
    --epochs "${EPOCHS:-1}" --shots "${SHOTS:-2}" --device "${DEVICE:-cpu}" "$@"
