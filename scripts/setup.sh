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
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
stamp=.venv/.saelab-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
    echo "saelab setup: installing into .venv (first run takes a few minutes)" >&2
    .venv/bin/python -m pip install -q --upgrade pip
    # Pin the CPU wheel first: an unpinned torch requirement would pull a multi-GB CUDA build.
    .venv/bin/python -m pip install -q "torch==${SAELAB_TORCH_VERSION:-2.13.0}"
    .venv/bin/python -m pip install -q -e ".[dev]"
    touch "$stamp"
fi

# Browser tests drive Debian's Chromium through Playwright; `playwright install` cannot download browsers here.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "saelab setup: installing chromium for the browser tests" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
