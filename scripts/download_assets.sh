#!/usr/bin/env bash
# Fetch model files on a machine WITH internet and verify their checksums:
#   source env.sh && bash scripts/download_assets.sh                # everything
#   source env.sh && bash scripts/download_assets.sh bert-base-uncased filo-train-on-visa
# Asset names and target paths: `python -m filo doctor`. Options and variables:
# `python -m filo download --help`. This is the only filo command that uses the network: it lifts
# the HF_HUB_OFFLINE=1 that env.sh exports, for its own process only.
#
# Hugging Face Hub assets (filo-train-on-*, grounding-train-on-*, bert-base-uncased) go through
# huggingface_hub at a pinned revision and honour HF_ENDPOINT (a Hub mirror), HF_HUB_CACHE /
# HF_HOME (the Hub cache; the file is hard-linked or copied from there to the doctor's path),
# HF_TOKEN, FILO_HF_REVISION_FILO and FILO_HF_REVISION_BERT (another commit, tag or branch).
# The other assets (clip-vit-l-14-336, groundingdino-swint-ogc, wide-resnet*) come over plain
# HTTPS, from FILO_ASSET_MIRROR/{asset name}/{file name} when that is set (it does not apply to
# Hub assets); a cut connection keeps <file>.part and running the script again resumes it.
#
# Offline, this fails within seconds (--timeout, default 10) with one line naming the endpoint
# and the path where the file can be placed by hand. Datasets (MVTec AD, VisA) need a licence
# acceptance and are not fetched here: see data/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=.venv/bin/python
exec "$PY" -m filo download "$@"
