#!/usr/bin/env bash
# The main job: `./demo.sh` runs `saelab demo` on the built-in defaults (extra arguments are passed through).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/saelab demo "$@"
