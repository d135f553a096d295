"""The README's main job: every stage of saelab on built-in defaults, writing results under one folder."""

from __future__ import annotations

from pathlib import Path


def run_demo(out: str | Path, quick: bool = False) -> Path:
    raise NotImplementedError
