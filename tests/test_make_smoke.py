"""``leaderboards/make_smoke.sh``: the committed smoke board is regenerated through the smoke preset's
sweep (``harness sweep --preset smoke``, resumable) and ``harness leaderboard ... --format
md,csv,html,tex``. Checked with ``DRY_RUN=1`` against the real harness (the sweep's plan, nothing
run or written) and with a stand-in ``HARNESS`` that logs its arguments (what the script runs, in
which order, and what it does with each exit code); the real sweep is never run here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "leaderboards" / "make_smoke.sh"


def run_script(env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT)], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_prints_the_smoke_sweep_plan_and_runs_nothing(tmp_path):
    harness = Path(sys.executable).parent / "harness"
    if not harness.exists():
        pytest.skip("no harness entry point next to this Python")
    res = run_script({"DRY_RUN": "1", "HARNESS": str(harness), "RESULTS": str(tmp_path / "results"),
                      "OUT": str(tmp_path / "board"), "ISOLATE": "reuse"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"sweep --preset smoke --output {tmp_path / 'results'} --isolate reuse --no-progress --dry-run" in res.stdout
    assert "sweep smoke: 36 cells (preset smoke)" in res.stdout  # 4 defences x 3 lrs x 3 seeds
    assert "defence          9" in res.stdout and "cell            36" in res.stdout
    assert not (tmp_path / "results").exists() and not (tmp_path / "board").exists()


FAKE_HARNESS = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
if [ "$1" = sweep ]; then mkdir -p "$FAKE_RESULTS/checkpoints"; exit "${FAKE_SWEEP_RC:-0}"; fi
exit 0
"""


@pytest.fixture
def fake(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    harness = bin_dir / "harness"
    harness.write_text(FAKE_HARNESS)
    harness.chmod(0o755)
    python = bin_dir / "python"  # the Python next to HARNESS: says whether CUDA is there
    python.write_text("#!/usr/bin/env bash\necho \"${FAKE_DEVICE:-cpu}\"\n")
    python.chmod(0o755)
    results, board, log = tmp_path / "results", tmp_path / "board", tmp_path / "calls.log"
    env = {"HARNESS": str(harness), "RESULTS": str(results), "OUT": str(board), "FAKE_LOG": str(log),
           "FAKE_RESULTS": str(results)}

    def go(**extra: str):
        res = run_script({**env, **extra})
        calls = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return res, calls

    return go, results, board


def test_sweep_then_leaderboard_in_every_format(fake):
    go, results, board = fake
    res, calls = go()
    assert res.returncode == 0, res.stderr
    assert calls == [f"sweep --preset smoke --output {results} --isolate reuse --no-progress",
                     f"leaderboard {results} --out {board} --format md,csv,html,tex --title Smoke leaderboard "
                     "(SmolLM2-135M, CPU)"]
    assert (results / "checkpoints").exists()  # kept unless CLEAN_CHECKPOINTS=1


def test_cuda_machine_keeps_the_default_isolation_and_extra_args_pass_through(fake):
    go, results, _ = fake
    res, calls = go(FAKE_DEVICE="cuda", EXTRA="--set eval.samples=16")
    assert res.returncode == 0 and calls[0] == f"sweep --preset smoke --output {results} --no-progress --set " \
                                               "eval.samples=16"
    res, calls = go(ISOLATE="process")
    assert calls[0] == f"sweep --preset smoke --output {results} --isolate process --no-progress"
    res, calls = go(ISOLATE="warm")
    assert res.returncode == 2 and not calls and "ISOLATE=warm" in res.stderr


def test_unfinished_cells_still_build_the_board_and_exit_1(fake):
    go, results, _ = fake
    res, calls = go(FAKE_SWEEP_RC="1", CLEAN_CHECKPOINTS="1")
    assert res.returncode == 1 and [c.split()[0] for c in calls] == ["sweep", "leaderboard"]
    assert "not finished" in res.stderr
    assert not (results / "checkpoints").exists()  # CLEAN_CHECKPOINTS=1


@pytest.mark.parametrize("rc", ["2", "130", "143"])
def test_a_stopped_sweep_builds_no_board(fake, rc):
    go, _, _ = fake
    res, calls = go(FAKE_SWEEP_RC=rc)
    assert res.returncode == int(rc) and [c.split()[0] for c in calls] == ["sweep"]
    assert "run the script again to resume" in res.stderr


def test_dry_run_with_the_stand_in(fake):
    go, results, _ = fake
    res, calls = go(DRY_RUN="1")
    assert res.returncode == 0 and calls == [f"sweep --preset smoke --output {results} --isolate reuse --no-progress "
                                             "--dry-run"]
