#!/usr/bin/env bash
# The test suite: lint, then pytest (extra arguments go to pytest, e.g. `./test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
.venv/bin/ruff check saelab tests benchmarks
exec .venv/bin/python -m pytest "$@"
