#!/usr/bin/env bash
# Check the page of `python -m filo serve` in a real browser: runs only tests/test_service_page.py
# (headless Chromium driven by Selenium against a live server with the tiny test models), for
# machines where the CI cannot run a browser.
#
#   source env.sh && bash scripts/browser_check.sh [pytest args]
#
# Chromium and its driver come from Debian (nothing is downloaded by Selenium):
#   apt-get install -y chromium chromium-driver
# Without them the test file is skipped; this script then fails so that the check is not
# mistaken for a pass. The test also saves a screenshot of the page to /tmp/filo_page.png.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export SE_OFFLINE=true  # Selenium Manager must not reach the network
missing=""
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
    || missing="chromium"
command -v chromedriver >/dev/null 2>&1 || missing="${missing:+$missing and }chromedriver"
if [ -n "$missing" ]; then
    echo "browser_check.sh: $missing not found on PATH; install them with" \
         "'apt-get install -y chromium chromium-driver'" >&2
    exit 2
fi
exec python -m pytest -q -p no:cacheprovider -rs tests/test_service_page.py "$@"
