"""``harness nightly``: run a pinned regression suite and compare it with its committed baseline.

    harness nightly [--suite smoke] [--output DIR] [--baseline FILE] [--update-baseline]

The runner: it writes the suite's inline data, builds its tiny models, runs every trial and seed
through ``harness.pipeline.trial.run_trial``, then hands the ``TrialRecord``s to the pure comparison
in ``leaderboards.nightly`` (metrics, tolerances, directions, the report) and writes
``report.md``, the baseline (``--update-baseline``) and a small leaderboard. The suite file format
is documented in ``leaderboards.suite``.

``model: {tiny: {arch: llama, layers: 2, hidden: 64, seed: 0, align: {data: qa, steps: 60, lr: 0.01}}}``
builds a tiny random model with ``harness.lib.tiny.build_tiny`` and, with ``align``, fine-tunes it for a
few steps to answer every prompt of that inline dataset with its refusal: a "safety-aligned"
tiny model whose harmfulness starts at 0 and can only go up, so that a weaker defence or a stronger
attack shows. It is cached under ``$HARNESS_CACHE/nightly-models/<hash>``.

Exit status: 0 when nothing regressed, 1 on a regression, a failed trial or a run in which no
metric could be compared, 2 on a usage error (no baseline, unknown suite, a baseline that cannot be
compared: NaN or missing numbers, no metrics, another suite; an unwritable --baseline or --output),
checked before any trial runs. ``--update-baseline`` writes the run's metrics as the new baseline on
purpose (refused when a trial failed).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

import harness
from harness.api.config import RunSpec, resolve
from harness.api.errors import ConfigError
from harness.api.record import ErrorInfo, TrialRecord
from harness.api.registry import ATTACKS
from harness.lib.models import cache_root
from harness.lib.provenance import git_commit
from harness.lib.store import atomic_write_bytes, atomic_write_json
from harness.lib.text import sft_batch
from harness.lib.tiny import build_tiny
from harness.pipeline.trial import run_trial
from leaderboards.baseline import Baseline
from leaderboards.nightly import CellResult, Comparison, compare, compared, render_report
from leaderboards.render import write_leaderboard
from leaderboards.suite import Suite, SuiteTrial, data_rows, load_suite

log = logging.getLogger("harness.nightly")

BASELINE_DIR = Path("results") / "baselines"


# ---------------------------------------------------------------------------------------------
# inline data and tiny models
# ---------------------------------------------------------------------------------------------
def data_folder() -> Path:
    """Where inline suite data is written: a fixed folder of the system temp dir, so that the file path,
    which the dataset reference (and with it the seeded data split and the trial id) contains, is the
    same on every machine and in every run folder; the harness cache if that is not writable."""
    folder = Path(tempfile.gettempdir()) / "harness-suite-data"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, delete=True)
        probe.close()
        return folder
    except OSError:
        return _mkdir(cache_root() / "suite-data")


def write_data(suite: Suite, folder: Optional[Path] = None) -> dict[str, Path]:
    """Write each inline dataset to ``<folder>/<content hash>/<name>.jsonl`` (never rewritten: a
    changed dataset gets a new path)."""
    folder = folder or data_folder()
    out = {}
    for name, spec in sorted(suite.data.items()):
        rows = data_rows(name, spec)
        blob = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()
        path = folder / hashlib.sha256(blob).hexdigest()[:16] / f"{name}.jsonl"
        if not (path.exists() and path.read_bytes() == blob):
            atomic_write_bytes(path, blob)
        out[name] = path
    return out


def substitute(text: str, paths: dict[str, Path], suite: Suite) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1)
        if name not in paths:
            raise ConfigError(f"suite {suite.name!r}: {{data:{name}}} names no dataset under 'data' "
                              f"(known: {', '.join(sorted(paths)) or 'none'})")
        return str(paths[name].resolve())

    text = re.sub(r"\{data:([A-Za-z0-9_.-]+)\}", repl, text)
    return text.replace("{suite_dir}", str(suite.path.parent.resolve()))


TINY_KEYS = {"arch", "layers", "hidden", "seed", "align"}
ALIGN_KEYS = {"data", "steps", "lr", "batch_size", "max_length"}


def build_suite_model(spec: dict[str, Any], suite: Suite) -> Path:
    """A tiny model folder for ``model: {tiny: {...}}``, built once and cached."""
    tiny = spec.get("tiny") if isinstance(spec, dict) else None
    if not isinstance(tiny, dict) or set(spec) != {"tiny"}:
        raise ConfigError(f"suite {suite.name!r}: model must be a model id / folder or {{tiny: {{...}}}}, not {spec!r}")
    bad = sorted(set(tiny) - TINY_KEYS)
    if bad:
        raise ConfigError(f"suite {suite.name!r}: model.tiny: unknown key(s) {', '.join(bad)}; allowed: "
                          f"{', '.join(sorted(TINY_KEYS))}")
    align = tiny.get("align")
    if align is not None:
        if not isinstance(align, dict) or "data" not in align or set(align) - ALIGN_KEYS:
            raise ConfigError(f"suite {suite.name!r}: model.tiny.align needs 'data' (a name under 'data') and may "
                              f"hold {', '.join(sorted(ALIGN_KEYS - {'data'}))}")
        if align["data"] not in suite.data:
            raise ConfigError(f"suite {suite.name!r}: model.tiny.align.data = {align['data']!r} is not under 'data'")
    rows = data_rows(align["data"], suite.data[align["data"]]) if align else []
    key = hashlib.sha256(json.dumps({"tiny": tiny, "rows": rows, "v": 1}, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_root() / "nightly-models" / f"tiny-{key}"
    if (folder / ".complete").exists():
        return folder
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains faster on one thread than two contended ones
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=_mkdir(folder.parent)))
        model, tok = build_tiny(None, arch=tiny.get("arch", "llama"), layers=int(tiny.get("layers", 2)),
                                hidden=int(tiny.get("hidden", 64)), seed=int(tiny.get("seed", 0)))
        if align:
            _align_tiny(model, tok, rows, align, seed=int(tiny.get("seed", 0)))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / ".complete").write_text(json.dumps({"tiny": tiny}, sort_keys=True))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        torch.set_num_threads(threads)
    log.info("built tiny suite model %s", folder)
    return folder


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _align_tiny(model, tok, rows: list[dict[str, str]], align: dict[str, Any], seed: int) -> None:
    """Teach the tiny model to answer every prompt with its refusal (Adam, constant lr)."""
    pairs = [(r["prompt"], r.get("refusal") or "I'm sorry, but I can't help with that request.") for r in rows]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=float(align.get("lr", 0.01)))
    model.train()
    bs = int(align.get("batch_size", 16))
    for _ in range(int(align.get("steps", 60))):
        chunk = rng.sample(pairs, min(bs, len(pairs)))
        b = sft_batch(tok, [p for p, _ in chunk], [r for _, r in chunk], int(align.get("max_length", 64)))
        loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


# ---------------------------------------------------------------------------------------------
# running a suite
# ---------------------------------------------------------------------------------------------
@dataclass
class NightlyResult:
    exit_code: int
    report: str
    report_path: Path
    comparisons: list[Comparison]
    cells: dict[str, CellResult]
    baseline_path: Path


def suite_specs(suite: Suite, extra_sets: Sequence[str] = (), model: str | None = None,
                model_ids: Optional[dict[str, str]] = None,
                build_models: bool = True) -> list[tuple[SuiteTrial, RunSpec]]:
    """``[(trial, RunSpec), ...]`` for every trial and seed, resolved and validated (nothing runs).
    ``model_ids`` collects the tiny models built (suite spec JSON -> folder); with
    ``build_models=False`` a ``{tiny: ...}`` model is left to the preset (for checking a suite)."""
    paths = write_data(suite)
    model_ids = {} if model_ids is None else model_ids

    def model_for(spec: Any) -> Optional[str]:
        if model:
            return model
        if spec is None:
            return None
        if isinstance(spec, dict):
            if not build_models:
                return None
            k = json.dumps(spec, sort_keys=True)
            if k not in model_ids:
                model_ids[k] = str(build_suite_model(spec, suite))
            return model_ids[k]
        return substitute(str(spec), paths, suite)

    plan = []
    for t in suite.trials:
        sets = [substitute(s, paths, suite) for s in [*suite.sets, *t.sets, *extra_sets]]
        m = model_for(t.model if t.model is not None else suite.model)
        for seed in t.seeds:
            plan.append((t, resolve(t.preset, defence=t.defence, attack=t.attack, model=m, seed=seed, sets=sets)))
    return plan


def default_baseline(suite: Suite) -> Path:
    return BASELINE_DIR / f"{suite.name}.json"


def check_baseline(suite: Suite, path: Path, update: bool) -> Optional[Baseline]:
    """The baseline to compare with, validated against ``suite`` (``None`` with ``update``: then the
    path must be writable). One-line ``ConfigError`` otherwise; called before any trial runs."""
    if update:
        if path.is_dir():
            raise ConfigError(f"--baseline {str(path)!r} is a directory; name the JSON file to write")
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK) or (
                path.exists() and not os.access(path, os.W_OK)):
            raise ConfigError(f"--baseline {str(path)!r}: cannot be written ({parent} is not a writable folder)")
        return None
    if not path.exists():
        raise ConfigError(f"no baseline for suite {suite.name!r} at {path}; create it on purpose with "
                          f"`harness nightly --suite {suite.name} --update-baseline`")
    return Baseline.read(path).check(suite, where=f"baseline {path}")


def not_started(spec: RunSpec, exc: Exception) -> TrialRecord:
    """The record of a trial that could not even start: a failed trial, not a crash of the suite."""
    attack = ATTACKS.get(spec.attack.name)
    return TrialRecord(trial_id=spec.trial_id, status="error", seed=spec.seed, config=spec.canonical(),
                       evaluation=attack.evaluation,
                       error=ErrorInfo(type=type(exc).__name__, stage="setup", message=str(exc)))


def run_suite(suite_name: str, output: str | Path | None = None, *, baseline_path: str | Path | None = None,
              update_baseline: bool = False, extra_sets: Sequence[str] = (), model: str | None = None,
              reuse: bool = False, keep_checkpoints: bool = False, leaderboard: bool = True,
              progress: bool = False) -> NightlyResult:
    suite = load_suite(suite_name)
    output = Path(output) if output else Path("results") / "nightly" / suite.name
    baseline_path = Path(baseline_path) if baseline_path else default_baseline(suite)
    baseline = check_baseline(suite, baseline_path, update_baseline)  # before any trial runs
    try:
        output.mkdir(parents=True, exist_ok=True)
        if not os.access(output, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "permission denied")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--output {str(output)!r}: cannot write the run folder there "
                          f"({getattr(exc, 'strerror', None) or exc})") from None
    model_ids: dict[str, str] = {}
    plan = suite_specs(suite, extra_sets, model, model_ids)

    def describe(spec_id: str) -> str:  # a built tiny model by its suite spec, not by its cache path
        for k, built in model_ids.items():
            if built == spec_id:
                return f"{json.dumps(json.loads(k), sort_keys=True, separators=(',', ':'))} [{Path(built).name}]"
        return spec_id

    model_text = model or ", ".join(sorted({describe(p[1].model.id) for p in plan}))
    ck_dir = output / "checkpoints" if reuse else Path(tempfile.mkdtemp(prefix="checkpoints-", dir=output))
    cells: dict[str, CellResult] = {t.name: CellResult(t.name, t.defence, t.attack) for t in suite.trials}
    t0 = time.perf_counter()
    try:
        for t, spec in plan:
            log.info("nightly %s: cell %s seed %s (%s)", suite.name, t.name, spec.seed, spec.trial_id)
            try:
                rec = run_trial(spec, output, checkpoints=ck_dir, force=not reuse, progress=progress)
            except Exception as exc:  # a trial that cannot even start is a failed trial, not a crash
                log.error("nightly %s: cell %s seed %s did not start: %s: %s", suite.name, t.name, spec.seed,
                          type(exc).__name__, exc)
                rec = not_started(spec, exc)
            cells[t.name].records.append(rec)
    finally:
        if not reuse and not keep_checkpoints:
            shutil.rmtree(ck_dir, ignore_errors=True)
    seconds = time.perf_counter() - t0
    env = next((dict(r.environment) for c in cells.values() for r in c.records if r.environment), None)
    if env is None:
        env = {"harness": harness.__version__, "git": git_commit(), "device": "unknown"}
    current = {name: c.metrics() for name, c in cells.items()}
    failed = [r for c in cells.values() for r in c.failed()]
    if update_baseline:
        if failed:
            comps = []
            report = render_report(suite, comps, cells, baseline_path=baseline_path, baseline=None, env=env,
                                   extra_sets=extra_sets, model=model_text, seconds=seconds)
            report += "\nThe baseline was NOT updated: a trial failed.\n"
            code = 1
        else:
            baseline = Baseline.of_run(suite, current, env, extra_sets, model_text,
                                       created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            atomic_write_json(baseline_path, baseline.to_json())
            comps = compare(current, baseline, suite)
            report = render_report(suite, comps, cells, baseline_path=baseline_path, baseline=baseline, env=env,
                                   extra_sets=extra_sets, model=model_text, seconds=seconds, updated=True)
            code = 0
    else:
        comps = compare(current, baseline, suite)
        report = render_report(suite, comps, cells, baseline_path=baseline_path, baseline=baseline, env=env,
                               extra_sets=extra_sets, model=model_text, seconds=seconds)
        code = 1 if (failed or any(c.regression for c in comps) or not compared(comps)) else 0
    report_path = output / "report.md"
    atomic_write_bytes(report_path, report.encode())
    if leaderboard:
        try:
            write_leaderboard([r for c in cells.values() for r in c.records], output / "leaderboard", ("md", "csv"),
                              title=f"Nightly suite {suite.name}", results_dir=output)
        except Exception as exc:  # the report matters more than the table
            log.warning("nightly leaderboard not written: %s", exc)
    return NightlyResult(code, report, report_path, comps, cells, baseline_path)
