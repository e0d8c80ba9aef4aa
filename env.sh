# filo environment. Use it with:  source env.sh
#
# First use (or after pyproject.toml changed): creates .venv and installs filo with its dev
# extras, printing progress. Later: only activates. Exports the paths every script reads; set any
# of them before sourcing to override it. Safe to source twice; never exits the calling shell and
# leaves its options (set -e, set -u, ...) as they were.

_filo_env_main() {
    local here py stamp want have
    here="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" >/dev/null 2>&1 && pwd)" || return 1
    export FILO_ROOT="${FILO_ROOT:-$here}"

    py="${FILO_PYTHON:-python3}"
    stamp="$FILO_ROOT/.venv/.filo-install-stamp"
    want="$(cd "$FILO_ROOT" && cat pyproject.toml | cksum | cut -d' ' -f1)"
    have="$(cat "$stamp" 2>/dev/null)"
    if [ ! -f "$FILO_ROOT/.venv/bin/activate" ] || [ "$want" != "$have" ]; then
        if [ -n "${FILO_NO_INSTALL:-}" ]; then
            echo "[filo] FILO_NO_INSTALL is set: not (re)installing .venv" >&2
        else
            echo "[filo] setting up $FILO_ROOT/.venv (first use or pyproject.toml changed)..."
            if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
                echo "[filo] error: $py is missing or older than Python 3.10; set FILO_PYTHON to a Python >= 3.10" >&2
                return 1
            fi
            if [ ! -f "$FILO_ROOT/.venv/bin/activate" ]; then
                echo "[filo] creating virtual environment with $py"
                "$py" -m venv "$FILO_ROOT/.venv" || { echo "[filo] error: could not create .venv" >&2; return 1; }
            fi
            echo "[filo] installing filo and its dependencies (torch is large: the first time takes a few minutes)"
            # FILO_PIP_ARGS: extra pip options for this install, e.g. a CPU-only torch index:
            #   FILO_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple"
            local -a pip_extra=()
            if [ -n "${FILO_PIP_ARGS:-}" ]; then
                read -r -a pip_extra <<< "$FILO_PIP_ARGS"
                echo "[filo] extra pip options (FILO_PIP_ARGS): ${pip_extra[*]}"
            fi
            "$FILO_ROOT/.venv/bin/python" -m pip install --upgrade --quiet pip >/dev/null 2>&1
            if ! (cd "$FILO_ROOT" && ./.venv/bin/python -m pip install --progress-bar on \
                    ${pip_extra[@]+"${pip_extra[@]}"} -e ".[dev]"); then
                echo "[filo] error: installation failed (see the pip output above); fix it and source env.sh again" >&2
                return 1
            fi
            echo "$want" > "$stamp"
            echo "[filo] environment ready"
        fi
    fi
    if [ -f "$FILO_ROOT/.venv/bin/activate" ] && [ "${VIRTUAL_ENV:-}" != "$FILO_ROOT/.venv" ]; then
        # shellcheck disable=SC1091
        . "$FILO_ROOT/.venv/bin/activate"
    fi

    export TRANSFORMERS_OFFLINE=1
    export HF_HUB_OFFLINE=1
    export HF_HUB_DISABLE_TELEMETRY=1
    export FILO_BERT_LOCAL="${FILO_BERT_LOCAL:-$FILO_ROOT/third_party/bert-base-uncased}"
    export MVTEC_ROOT="${MVTEC_ROOT:-$FILO_ROOT/data/mvtec_anomaly_detection}"
    export VISA_ROOT="${VISA_ROOT:-$FILO_ROOT/data/VisA_20220922}"
    export MPDD_ROOT="${MPDD_ROOT:-$FILO_ROOT/data/MPDD}"
    export BTAD_ROOT="${BTAD_ROOT:-$FILO_ROOT/data/BTAD}"
    export MVTEC_AD2_ROOT="${MVTEC_AD2_ROOT:-$FILO_ROOT/data/mvtec_ad_2}"
    export REALIAD_ROOT="${REALIAD_ROOT:-$FILO_ROOT/data/Real-IAD}"
    export CKPT_DIR="${CKPT_DIR:-$FILO_ROOT/ckpt}"
    export VIZ_DIR="${VIZ_DIR:-$FILO_ROOT/outputs/viz}"
    export RESULTS_DIR="${RESULTS_DIR:-$FILO_ROOT/outputs/results}"
    return 0
}

# Run with errexit/nounset off, then put the caller's options back exactly as they were.
_filo_saved_opts="$(set +o)"
set +e +u
_filo_env_main
_filo_env_rc=$?
eval "$_filo_saved_opts"
unset -f _filo_env_main
unset _filo_saved_opts
# `return` works when sourced; `true` keeps an accidental `bash env.sh` from failing oddly.
return "$_filo_env_rc" 2>/dev/null || true
