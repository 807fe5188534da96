"""Test helper: a small data-reading test defence, and a subprocess driver that runs one trial on
the tiny model and can SIGKILL itself at the k-th call of an instrumented point.

Used by ``tests/test_faults.py`` (and the defence also by the bad-input and secrets tests). It
depends on no defence of ``defences/``: ``test_refusal_sft`` is defined here.

    python tests/fault_driver.py run    --dir D --model TINY [--fault POINT:K]
    python tests/fault_driver.py resume --model TINY D1 D2 ...
    python tests/fault_driver.py cli [--pause-at STAGE --ready F --go F] [--fail-at STAGE] -- run ...

Each scenario folder ``D`` holds ``results/`` (records, samples, ``results/checkpoints/``) and
``cache/`` (``HARNESS_CACHE``). ``run`` writes ``D/trace.json``: the instrumented events in the
order they happened (point, per-point count k, stage), so a test can pick kill points from a clean
run. ``resume`` runs the same trial again in each folder, with no fault, and writes
``D/resume.json``: which files the killed run left behind that must not be trusted (``*.tmp``,
``*.partial-*`` folders, checkpoint folders without ``.complete``), which of those this run opened
(via an audit hook on ``open``), whether the defended checkpoint was complete before, and the
record.

Instrumented points (``--fault POINT:K`` kills the process just before/after the k-th event):
    optimizer_step   before the k-th optimizer step (defence and attack training)
    generate_batch   after the k-th ``model.generate`` batch (synthetic data, pre/post evaluation)
    save_weights     after the k-th ``save_pretrained`` of a model (checkpoint written to the
                     ``.partial-*`` folder, not yet renamed into place)
    marker           before the k-th checkpoint ``.complete`` marker is written
    rename           before the k-th rename of a fully written ``*.tmp`` file (records, caches,
                     marker, samples) onto its final name
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness.api.components import Defence, DatasetRef, TrainConfig  # noqa: E402

TEST_DEFENCE = "test_refusal_sft"

# tiny, fast trial settings (shared with tests/test_trial.py's FAST)
FAST = ["eval.toxicity_scorer.name=keyword_refusal", "eval.samples=6", "eval.max_new_tokens=6",
        "eval.batch_size=4", "attack.samples=8", "attack.max_length=48", "synth.max_new_tokens=6"]
FAULT_SETS = FAST + ["defence.samples=12", "defence.batch_size=4", "defence.max_length=48"]


class RefusalSFT(Defence):
    """Test-only defence: supervised fine-tuning on the refusals of the defence data."""

    needs_data = True

    class Config(TrainConfig):
        lr: float = 1e-3
        samples: int = 12
        batch_size: int = 4
        max_length: int = 48
        dataset: DatasetRef = DatasetRef(name="smoke")

    def apply(self, model, tokenizer, data, ctx):
        from harness.lib import training
        from harness.lib.text import batches, sft_batch

        rows = [ex for ex in data if ex.refusal]
        if not rows:
            raise ValueError("test_refusal_sft: no refusals to train on")
        tensors = [sft_batch(tokenizer, [e.prompt for e in chunk], [e.refusal for e in chunk],
                             self.config.max_length).to(ctx.device)
                   for chunk in batches(rows, self.config.batch_size)]

        def loss_fn(m, b):
            return m(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss

        training.train_loop(model, tensors, self.config, ctx, loss_fn=loss_fn, desc="defence test")
        return model


def register(monkeypatch=None) -> None:
    """Register the test defence; with ``monkeypatch`` the registration is undone after the test."""
    from harness.api.registry import DEFENCES

    DEFENCES.names()  # load the built-ins first
    if monkeypatch is not None:
        monkeypatch.setitem(DEFENCES._items, TEST_DEFENCE, RefusalSFT)
        monkeypatch.setattr(RefusalSFT, "registry_name", TEST_DEFENCE, raising=False)
    elif TEST_DEFENCE not in DEFENCES._items:
        DEFENCES.add(TEST_DEFENCE, RefusalSFT)


def make_spec(model: str, extra: list[str] = ()):
    from harness.api.config import resolve

    return resolve("smoke", defence=TEST_DEFENCE, model=model, sets=FAULT_SETS + list(extra))


# ---- instrumentation -----------------------------------------------------------------------------
class Faults:
    def __init__(self, fault: str | None):
        self.target = None
        if fault:
            point, k = fault.split(":")
            self.target = (point, int(k))
        self.counts: dict[str, int] = {}
        self.trace: list[dict[str, Any]] = []
        self.stage = "setup"

    def hit(self, point: str, stage: str | None = None, when: str = "before") -> None:
        self.counts[point] = k = self.counts.get(point, 0) + 1
        self.trace.append({"point": point, "k": k, "stage": stage or self.stage})
        if self.target == (point, k):
            sys.stderr.write(f"fault_driver: SIGKILL at {point}:{k} ({stage or self.stage})\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def install(self, results: Path) -> None:
        import torch
        import transformers
        from transformers.generation.utils import GenerationMixin

        import harness.lib.checkpoints as checkpoints
        from harness.pipeline import stages

        faults = self

        def staged(stage):
            def run(t):
                faults.stage = stage.name
                return stage.run(t)
            return dataclasses.replace(stage, run=run)

        # every event is attributed to the trial stage running when it happens
        stages.STAGES = tuple(staged(s) for s in stages.STAGES)

        from torch.optim.optimizer import register_optimizer_step_pre_hook

        register_optimizer_step_pre_hook(lambda opt, args, kwargs: faults.hit("optimizer_step"))

        orig_generate = GenerationMixin.generate

        def generate(self, *args, **kwargs):
            out = orig_generate(self, *args, **kwargs)
            faults.hit("generate_batch")
            return out

        GenerationMixin.generate = generate

        orig_save = transformers.PreTrainedModel.save_pretrained

        def save_pretrained(self, *args, **kwargs):
            out = orig_save(self, *args, **kwargs)
            faults.hit("save_weights", "defence")
            return out

        transformers.PreTrainedModel.save_pretrained = save_pretrained

        orig_marker = checkpoints.atomic_write_json

        def marker(path, obj):
            faults.hit("marker", "defence")
            return orig_marker(path, obj)

        checkpoints.atomic_write_json = marker

        orig_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if str(src).endswith(".tmp"):
                d = Path(dst)
                if d.name == ".complete":
                    stage = "defence"
                elif d.name.startswith("pre_attack-"):
                    stage = "pre_attack"
                elif d.parent == results or d.parent.name == "samples":
                    stage = "record"
                else:
                    stage = "data"
                faults.hit("rename", stage)
            return orig_replace(src, dst, *args, **kwargs)

        os.replace = replace


# ---- untrusted leftovers ---------------------------------------------------------------------------
def untrusted_files(results: Path) -> list[str]:
    """Files a killed run left that no later run may trust."""
    out = set()
    if not results.exists():
        return []
    for path in results.rglob("*"):
        if path.is_file() and path.name.endswith(".tmp"):
            out.add(str(path))
        if path.is_dir() and ".partial-" in path.name:
            out.update(str(p) for p in path.rglob("*") if p.is_file())
    ck_root = results / "checkpoints"
    if ck_root.exists():
        for folder in ck_root.iterdir():
            if (folder.is_dir() and ".partial-" not in folder.name and folder.name != ".locks"  # lock files: not outputs
                    and not (folder / ".complete").exists()):
                out.update(str(p) for p in folder.rglob("*") if p.is_file())
    return sorted(out)


def setup_process() -> None:
    import torch

    torch.set_num_threads(1)  # identical arithmetic in every process, and two runs share 2 cores
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    register()


def preimport() -> None:
    """Import everything a trial needs once, so forked children start in milliseconds. Nothing
    here runs a torch op or a tokenizer (both must not start thread pools before a fork)."""
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401
    from transformers.generation.utils import GenerationMixin  # noqa: F401

    import harness.pipeline.trial  # noqa: F401
    from harness.api.registry import REGISTRIES

    for registry in REGISTRIES.values():
        registry.names()


def run_one(d: Path, model: str, fault: str | None) -> dict:
    """One trial in folder ``d`` (records in ``d/results``, cache in ``d/cache``), optionally
    killed at ``fault``; writes ``d/trace.json``."""
    from harness.pipeline.trial import run_trial

    os.environ["HARNESS_CACHE"] = str(d / "cache")
    spec = make_spec(model)
    faults = Faults(fault)
    faults.install(d / "results")
    rec = run_trial(spec, d / "results", progress=False)
    (d / "trace.json").write_text(json.dumps(faults.trace))
    return rec


def resume_one(d: Path, model: str, opened: list[str]) -> dict:
    """Rerun the trial of folder ``d`` without faults; write ``d/resume.json``."""
    from harness.pipeline.trial import run_trial

    spec = make_spec(model)
    results = d / "results"
    os.environ["HARNESS_CACHE"] = str(d / "cache")
    bad = untrusted_files(results) + untrusted_files(d / "cache")
    ck = results / "checkpoints" / spec.defence_key()
    complete_before = (ck / ".complete").exists()
    opened.clear()
    rec = run_trial(spec, results, progress=False)
    seen = sorted({os.path.abspath(p) for p in opened} & {os.path.abspath(p) for p in bad})
    out = {"untrusted": bad, "opened_untrusted": seen, "ck_complete_before": complete_before,
           "record": rec.to_json(), "skipped": rec.skipped}
    (d / "resume.json").write_text(json.dumps(out))
    return out


def audit_opens() -> list[str]:
    opened: list[str] = []

    def hook(event, a):
        if event == "open" and a and isinstance(a[0], (str, os.PathLike)):
            opened.append(os.fspath(a[0]))

    sys.addaudithook(hook)
    return opened


def forked(fn) -> int:
    """Run ``fn`` in a forked child; return its wait status."""
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            fn()
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def describe_status(status: int) -> dict:
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status), "exit": None}
    return {"signal": None, "exit": os.WEXITSTATUS(status)}


def chain(d: Path, model: str, faults: list[str]) -> None:
    """Kill a run at each of ``faults`` in turn (each run resumes the previous one's folder),
    then resume once more without a fault. Writes ``d/chain.json``."""
    kills = []
    for fault in faults:
        status = forked(lambda: (setup_process(), run_one(d, model, fault)))
        kills.append({"fault": fault, **describe_status(status)})

    def resume():
        setup_process()
        opened = audit_opens()
        resume_one(d, model, opened)

    status = forked(resume)
    (d / "chain.json").write_text(json.dumps({"kills": kills, "resume": describe_status(status)}))


def cmd_campaign(args) -> int:
    """Clean run, then one chain of kills + resume per entry of ``--chains`` (``P:K`` or
    ``P:K+P:K``; ``all`` = every event of the clean run's trace), two chains at a time."""
    preimport()
    root = Path(args.root)
    clean = root / "clean"
    clean.mkdir(parents=True, exist_ok=True)
    status = forked(lambda: (setup_process(), run_one(clean, args.model, None)))
    if describe_status(status)["exit"] != 0:
        print("clean run failed", file=sys.stderr)
        return 1
    trace = json.loads((clean / "trace.json").read_text())
    if args.chains == ["all"]:
        chains = [[f"{e['point']}:{e['k']}"] for e in trace]
    else:
        chains = [c.split("+") for c in args.chains]
    jobs = [(root / f"chain{i:02d}", faults) for i, faults in enumerate(chains)]
    running: dict[int, Path] = {}
    for d, faults in jobs:
        d.mkdir(parents=True, exist_ok=True)
        (d / "faults.json").write_text(json.dumps(faults))
        while len(running) >= args.jobs:
            pid, _ = os.wait()
            running.pop(pid, None)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                chain(d, args.model, faults)
                code = 0
            finally:
                os._exit(code)
        running[pid] = d
    while running:
        pid, _ = os.wait()
        running.pop(pid, None)
    (root / "campaign.json").write_text(json.dumps({"trace": trace, "chains": [str(d) for d, _ in jobs]}))
    return 0


def cmd_run(args) -> int:
    setup_process()
    rec = run_one(Path(args.dir), args.model, args.fault)
    print(json.dumps({"status": rec.status, "trial_id": rec.trial_id}))
    return 0


def cmd_resume(args) -> int:
    setup_process()
    opened = audit_opens()
    for folder in args.dirs:
        resume_one(Path(folder), args.model, opened)
    return 0


def cmd_cli(args) -> int:
    """``harness`` itself (``harness.cli.main``) with the test defence registered; ``--pause-at STAGE``
    writes ``--ready`` when STAGE starts and waits there until ``--go`` exists (a test sends its signal
    meanwhile); ``--fail-at STAGE`` raises there."""
    setup_process()
    from harness.cli.main import main as harness_main
    from harness.pipeline import stages

    def wrap(stage):
        def run(t):
            if stage.name == args.pause_at:
                Path(args.ready).write_text(str(os.getpid()))
                while not (args.go and Path(args.go).exists()):
                    import time

                    time.sleep(0.05)
            if stage.name == args.fail_at:
                raise RuntimeError(f"fault_driver: failure injected in {stage.name}")
            return stage.run(t)
        return dataclasses.replace(stage, run=run)

    stages.STAGES = tuple(wrap(s) for s in stages.STAGES)
    return harness_main(args.argv)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one trial, optionally killed at --fault POINT:K")
    r.add_argument("--dir", required=True)
    r.add_argument("--model", required=True)
    r.add_argument("--fault")
    r.set_defaults(func=cmd_run)
    s = sub.add_parser("resume", help="rerun the trial of each folder without faults")
    s.add_argument("--model", required=True)
    s.add_argument("dirs", nargs="+")
    s.set_defaults(func=cmd_resume)
    c = sub.add_parser("campaign", help="clean run + kill/resume chains in forked children")
    c.add_argument("--model", required=True)
    c.add_argument("--root", required=True)
    c.add_argument("--jobs", type=int, default=2)
    c.add_argument("chains", nargs="+", help="'all', or chains like optimizer_step:2 or rename:1+generate_batch:3")
    c.set_defaults(func=cmd_campaign)
    h = sub.add_parser("cli", help="harness ARGV... with the test defence, optionally paused or failing at a stage")
    h.add_argument("--pause-at")
    h.add_argument("--ready")
    h.add_argument("--go")
    h.add_argument("--fail-at")
    h.add_argument("argv", nargs=argparse.REMAINDER)
    h.set_defaults(func=cmd_cli)
    args = p.parse_args(argv)
    if getattr(args, "argv", None) and args.argv[0] == "--":
        args.argv = args.argv[1:]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
