"""Running the `saelab` command in the test process, and checking that a failure is one line."""

from __future__ import annotations

import contextlib
import hashlib
import io
import sys
from pathlib import Path

from saelab.cli import main


def saelab(*args: object) -> tuple[int, str, str]:
    """Run the `saelab` command in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["saelab", *(str(a) for a in args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                status = 0
            except SystemExit as exit_:
                status = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    return status, out.getvalue(), err.getvalue()


def one_line_error(status: int, stderr: str, *fragments: str) -> str:
    """Assert the run failed with exactly one `saelab: error:` line (no traceback) containing every fragment."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("saelab: error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(path: Path) -> dict[str, str]:
    """Every file under `path` (or `path` itself) with a hash of its contents."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
