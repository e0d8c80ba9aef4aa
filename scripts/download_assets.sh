#!/usr/bin/env bash
# Fetch model files on a machine WITH internet and verify their checksums:
#   source env.sh && bash scripts/download_assets.sh                # everything
#   source env.sh && bash scripts/download_assets.sh bert-base-uncased filo-train-on-visa
# Asset names and target paths: `python -m filo doctor`. Offline, this fails within seconds
# with one line naming the file to place by hand. Datasets (MVTec AD, VisA) need a licence
# acceptance and are not fetched here: see data/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=.venv/bin/python
exec "$PY" -m filo download "$@"
