#!/usr/bin/env bash
# Create .venv and install saelab with its dev extras. Idempotent: reinstalls only when pyproject.toml changed.
# Sourced by demo.sh and test.sh so that a fresh clone needs nothing but Python >= 3.10.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python_bin="${PYTHON:-}"
if [ -z "$python_bin" ]; then
    for candidate in python3.11 python3.12 python3.10 python3; do
        if command -v "$candidate" >/dev/null 2>&1; then python_bin="$candidate"; break; fi
    done
fi
if [ ! -x .venv/bin/python ]; then
    echo "saelab setup: creating .venv with $("$python_bin" --version 2>&1)" >&2
    "$python_bin" -m venv .venv
fi
# Every installer's full output goes to this log; the terminal gets one line per step (and the log's tail on failure).
log=.venv/setup.log
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
step() {
    local what=$1
    shift
    echo "saelab setup: $what" >&2
    if ! "$@" >>"$log" 2>&1; then
        echo "saelab setup: failed: $what; the last lines of $log:" >&2
        tail -n 15 "$log" >&2
        exit 1
    fi
}
stamp=.venv/.saelab-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
    echo "saelab setup: installing into .venv (the first run takes a few minutes; full log in $log)" >&2
    step "1/3 pip" .venv/bin/python -m pip install --upgrade pip
    # Pin the CPU wheel first: an unpinned torch requirement would pull a multi-GB CUDA build.
    step "2/3 torch ${SAELAB_TORCH_VERSION:-2.13.0} (CPU build)" \
        .venv/bin/python -m pip install "torch==${SAELAB_TORCH_VERSION:-2.13.0}"
    step "3/3 saelab and its dependencies (transformer-lens, transformers, safetensors, plotly, pytest, ...)" \
        .venv/bin/python -m pip install -e ".[dev]"
    touch "$stamp"
    echo "saelab setup: done" >&2
fi

# Browser tests drive Debian's Chromium through Playwright; `playwright install` cannot download browsers here.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    mkdir -p .venv
    step "installing chromium for the browser tests (apt-get)" \
        bash -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver'
fi
