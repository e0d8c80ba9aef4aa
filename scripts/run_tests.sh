#!/usr/bin/env bash
# Run the test suite offline. Use after `source env.sh` (the README's test command):
#   source env.sh && bash scripts/run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export PYTHONHASHSEED=0
# Tests write only under pytest's tmp dirs; keep the checksum cache out of $HOME.
export FILO_CACHE_DIR="${FILO_CACHE_DIR:-$(mktemp -d)}"
# The page test drives headless Chromium (Debian's chromium + chromium-driver); without them it is
# skipped. CI (CI=true, root) installs them when missing; elsewhere: scripts/browser_check.sh.
if [ -n "${CI:-}" ] && ! command -v chromedriver >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
        && command -v apt-get >/dev/null 2>&1; then
    echo "run_tests.sh: installing chromium for the page test (CI)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        chromium chromium-driver) >/dev/null 2>&1 \
        || echo "run_tests.sh: chromium could not be installed; the page test will be skipped"
fi
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "run_tests.sh: pytest collected no tests" >&2
fi
exit "$rc"
