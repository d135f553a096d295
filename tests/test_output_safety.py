"""The --out safety matrix: every writing command, run for real through the CLI, against every way an --out can
be wrong. saelab deletes nothing it did not write, never writes over its inputs, the working or the home
directory, runs one writer per --out, cleans a killed run's temporaries and leaves nothing when a run fails."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error, saelab, snapshot

from saelab.errors import SaelabError
from saelab.io import output_lock, partial_folder, remove_stale_temporaries
from saelab.sae.io import load_sae
from saelab.sae.model import SAEConfig
from saelab.sae.sources import ToySource
from saelab.sae.train import CHECKPOINT_FILE, SAETrainConfig, train_saes


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """A real toy model, an SAE trained on it and its dashboard site: the inputs of the commands under test."""
    root = tmp_path_factory.mktemp("inputs")
    toy, sae, site = root / "toy", root / "sae", root / "site"
    for args in (
        ["toy", "train", "--out", toy, "--n-features", "3", "--d-hidden", "2", "--n-instances", "1",
         "--steps", "30", "--no-progress"],
        ["sae", "train", "--source", f"toy:{toy}", "--d-sae", "8", "--k", "1", "--steps", "5", "--batch-size", "64",
         "--quiet", "--out", sae],
        ["dashboard", sae, "--out", site, "--sequences", "4", "--context", "8"],
    ):  # fmt: skip
        status, _, stderr = saelab(*args)
        assert status == 0, stderr
    return {"toy": toy, "sae": sae, "site": site}


Command = Callable[[dict[str, Path], Path], list[object]]
COMMANDS: dict[str, Command] = {
    "toy train": lambda m, out: ["toy", "train", "--out", out, "--n-features", "3", "--d-hidden", "2",
                                 "--n-instances", "1", "--steps", "20", "--no-progress"],
    "toy phase-diagram": lambda m, out: ["toy", "phase-diagram", "--out", out, "--grid", "2", "--replicas", "1",
                                         "--steps", "20", "--no-progress"],
    "toy analyze": lambda m, out: ["toy", "analyze", m["toy"], "--out", out],
    "toy llc": lambda m, out: ["toy", "llc", m["toy"], "--out", out, "--samples", "256", "--batch-size", "64",
                               "--chains", "1", "--draws", "5", "--burnin", "2", "--no-progress"],
    "toy sae-benchmark": lambda m, out: ["toy", "sae-benchmark", "--quick", "--out", out, "--no-progress"],
    "sae train": lambda m, out: ["sae", "train", "--source", f"toy:{m['toy']}", "--d-sae", "8", "--k", "1",
                                 "--steps", "5", "--batch-size", "64", "--quiet", "--out", out],
    "dashboard": lambda m, out: ["dashboard", m["sae"], "--out", out, "--sequences", "4", "--context", "8"],
    "activations cache": lambda m, out: ["activations", "cache", "--hook", "blocks.0.hook_resid_post",
                                         "--tokens", "64", "--context-length", "16", "--batch-size", "64",
                                         "--buffer-tokens", "128", "--out", out],
    "lm train": lambda m, out: ["lm", "train", "--out", out, "--tokens", "1000"],
    "demo": lambda m, out: ["demo", "--quick", "--out", out],
}  # fmt: skip
# The commands cheap enough to run to completion here (the others are refused before they do any work).
RUNS = ("toy train", "toy phase-diagram", "toy analyze", "sae train", "dashboard")
# The inputs each command reads.
INPUTS = {"toy analyze": "toy", "toy llc": "toy", "sae train": "toy", "dashboard": "sae"}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_foreign_folder_is_refused_and_kept(command: str, made, tmp_path: Path) -> None:
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    before = snapshot(out)
    status, _, stderr = saelab(*COMMANDS[command](made, out))
    one_line_error(status, stderr, "is not empty", "thesis.tex", "--overwrite")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]  # no lock, temporary or partial folder left


@pytest.mark.parametrize("command", list(COMMANDS))
def test_never_the_working_or_home_directory_even_with_overwrite(
    command: str, made, tmp_path: Path, monkeypatch
) -> None:
    work, home = tmp_path / "work", tmp_path / "home"
    for folder in (work, home):
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    for out, what in ((".", "is the working directory"), (tmp_path, "contains the working directory"),
                      (home, "is your home directory")):  # fmt: skip
        status, _, stderr = saelab(*COMMANDS[command](made, Path(out)), "--overwrite")
        one_line_error(status, stderr, what)
    assert (work / "notes.txt").read_text() == "mine" and (home / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "work"]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_path_under_a_file_is_one_line(command: str, made, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    status, _, stderr = saelab(*COMMANDS[command](made, tmp_path / "file" / "out"))
    one_line_error(status, stderr, "sits under a file")
    status, _, stderr = saelab(*COMMANDS[command](made, tmp_path / "file"))
    one_line_error(status, stderr, "is a file")


@pytest.mark.parametrize("command", list(INPUTS))
def test_never_over_an_input_even_with_overwrite(command: str, made, tmp_path: Path) -> None:
    source = made[INPUTS[command]]
    before = snapshot(source)
    for out, how in ((source, "is"), (source / "inner", "sits inside"), (source.parent, "contains")):
        status, _, stderr = saelab(*COMMANDS[command](made, out), "--overwrite")
        one_line_error(status, stderr, f" {how} {source}", "an input of this run")
    assert snapshot(source) == before


@pytest.mark.parametrize("command", RUNS)
def test_own_output_is_replaced_and_overwrite_replaces_a_foreign_folder(command: str, made, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for _ in range(2):  # the second run replaces the first one's complete output without asking
        status, _, stderr = saelab(*COMMANDS[command](made, out))
        assert status == 0, stderr
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("replace me")
    status, _, stderr = saelab(*COMMANDS[command](made, tmp_path / "mine"), "--overwrite")
    assert status == 0, stderr
    assert not (tmp_path / "mine" / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]  # no lock or temporary left


def test_one_run_per_out_and_stale_temporaries_are_cleaned(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = COMMANDS["toy train"]({}, out)
    with output_lock(out):
        status, _, stderr = saelab(*args)
    one_line_error(status, stderr, f"another saelab run (process {os.getpid()}) is writing {out}")
    assert not out.exists()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, live_pid = int(dead.stdout), os.getpid()
    leftovers = [f".run.{dead_pid}.abcd1234.tmp", f".run.{dead_pid}.abcd1234.old"]
    kept = [f".run.{live_pid}.abcd1234.tmp", ".run.keep.tmp", f".other.{dead_pid}.abcd1234.tmp", "run.txt"]
    for name in leftovers + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "file").write_text("x")
    (tmp_path / ".run.lock").write_text(f"{dead_pid}\n")  # the lock file of a killed run: taken over
    status, _, stderr = saelab(*args)
    assert status == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "run"])
    assert remove_stale_temporaries(out) == []


def test_a_failed_run_leaves_nothing(made, tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "run"
    status, _, stderr = saelab(*COMMANDS["toy train"]({}, out), "--lr", "1e30")
    one_line_error(status, stderr, "diverged", "nothing was written")
    status, _, stderr = saelab(*COMMANDS["sae train"](made, out), "--lr", "inf")
    one_line_error(status, stderr, "lr")
    status, _, stderr = saelab(*COMMANDS["dashboard"](made, out), "--features", "0-99999999999")
    one_line_error(status, stderr, "--features")
    assert list(tmp_path.iterdir()) == []


def test_refreshing_in_place_replaces_only_saelabs_files(made, tmp_path: Path) -> None:
    toy = tmp_path / "toy"
    status, _, stderr = saelab("toy", "analyze", made["toy"], "--out", toy)
    assert status == 0, stderr
    (toy / "notes.txt").write_text("my notes")
    (toy / "analysis.json").write_text("{}")
    status, _, stderr = saelab("toy", "analyze", toy)
    assert status == 0, stderr
    assert (toy / "notes.txt").read_text() == "my notes"
    assert len((toy / "analysis.json").read_text()) > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]


def test_an_sae_stays_loadable_until_its_replacement_is_complete(made, tmp_path: Path) -> None:
    out = tmp_path / "sae"
    status, _, stderr = saelab(*COMMANDS["sae train"](made, out))
    assert status == 0, stderr
    old = load_sae(out).state_dict()
    configs = SAEConfig("topk", 2, 8, k=1)
    cfg = SAETrainConfig(steps=40, batch_size=64, checkpoint_every=10, init_tokens=256)

    class Crashing(ToySource):
        left = 25

        def read(self, batch_size: int) -> torch.Tensor:
            self.left -= 1
            if self.left < 0:
                raise RuntimeError("killed")
            return super().read(batch_size)

    with pytest.raises(RuntimeError, match="killed"):
        train_saes(Crashing(made["toy"]), configs, cfg, out=out, progress=False)
    for name, tensor in load_sae(out).state_dict().items():  # the old SAE, whole
        assert torch.equal(tensor, old[name]), name
    assert (partial_folder(out) / CHECKPOINT_FILE).is_file()
    with pytest.raises(SaelabError, match="unfinished run"):
        train_saes(ToySource(made["toy"]), configs, cfg, out=out, progress=False)
    train_saes(ToySource(made["toy"]), configs, cfg, out=out, resume=True, progress=False)
    assert load_sae(out).saved_info["trained_steps"] == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_export_writes_files_only_where_it_may(made, tmp_path: Path) -> None:
    site = made["site"]
    before = snapshot(site)
    status, _, stderr = saelab("export", site, "--latents", "0,1", "--out", tmp_path)
    one_line_error(status, stderr, "is a folder")
    (tmp_path / "report.html").write_text("my report")
    status, _, stderr = saelab("export", site, "--latents", "0,1", "--out", tmp_path / "report.html")
    one_line_error(status, stderr, "not a saelab HTML export", "--overwrite")
    assert (tmp_path / "report.html").read_text() == "my report"
    status, _, stderr = saelab("export", site, "--latents", "0,1", "--out", site / "index.html", "--overwrite")
    one_line_error(status, stderr, "sits inside", "an input of this run")
    for _ in range(2):  # an earlier export is replaced
        status, _, stderr = saelab("export", site, "--latents", "0,1", "--out", tmp_path / "x.html",
                                   "--neuronpedia", tmp_path / "x.json")  # fmt: skip
        assert status == 0, stderr
    status, _, stderr = saelab("export", site, "--latents", "0", "--out", tmp_path / "report.html", "--overwrite")
    assert status == 0, stderr
    assert snapshot(site) == before
