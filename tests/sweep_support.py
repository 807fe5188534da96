"""Test support for the sweep tests: a counting test defence (imported by the driver and by every
Ray worker as the sweep plugin ``sweep_support``) and one Ray instance for the whole session.

``sweep_counting`` perturbs the weights a little (so the checkpoint differs from the base model),
and appends a line to ``$SWEEP_TEST_DIR/<tag>.attempts`` on every call and to
``$SWEEP_TEST_DIR/<tag>.trained`` when it succeeds, so tests count trainings instead of assuming
them. ``fail: always`` raises on every attempt, ``fail: once`` on the first only; ``sleep_s`` makes
the stage last long enough to observe overlap.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from harness.api.components import ComponentConfig, DatasetRef, Defence, TextScorer, TrainConfig
from harness.api.registry import DEFENCES, METRICS

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
NAME = "sweep_counting"
SFT_NAME = "sweep_refusal_sft"
API_NAME = "sweep_api_scorer"

# settings that make one tiny cell take a few seconds (used with the smoke preset)
FAST_SETS = {"eval.toxicity_scorer.name": "keyword_refusal", "eval.samples": 4, "eval.max_new_tokens": 6,
             "eval.batch_size": 4, "attack.samples": 8, "attack.max_length": 48, "synth.max_new_tokens": 6}


def counter_dir() -> Path:
    return Path(os.environ.get("SWEEP_TEST_DIR", "/tmp/sweep-test-counters"))


def count(tag: str, what: str = "trained") -> int:
    path = counter_dir() / f"{tag}.{what}"
    return len(path.read_text().splitlines()) if path.exists() else 0


class CountingDefence(Defence):
    """Test-only defence: adds seeded noise to the weights and counts its own runs."""

    needs_data = False

    class Config(ComponentConfig):
        tag: str = "default"
        sleep_s: float = Field(0.0, ge=0)
        fail: Literal["never", "always", "once"] = "never"
        fail_attack: bool = False  # raise in prepare_attack: the cell stage fails, the defence does not
        noise: float = 1e-3

    def apply(self, model, tokenizer, data, ctx):
        import torch

        c = self.config
        d = counter_dir()
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"{c.tag}.attempts", "a") as fh:
            fh.write(f"{os.getpid()} {time.time()}\n")
        attempt = count(c.tag, "attempts")
        if c.fail == "always" or (c.fail == "once" and attempt == 1):
            raise RuntimeError(f"sweep_counting {c.tag}: injected failure on attempt {attempt}")
        time.sleep(c.sleep_s)
        g = ctx.generator()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(c.noise * torch.randn(p.shape, generator=g).to(p.dtype))
        ctx.stats["train"] = {"steps": 0, "tag": c.tag}
        with open(d / f"{c.tag}.trained", "a") as fh:
            fh.write(f"{os.getpid()} {time.time()}\n")
        return model

    def prepare_attack(self, model, tokenizer, ctx):
        if self.config.fail_attack:
            with open(counter_dir() / f"{self.config.tag}.attack_attempts", "a") as fh:
                fh.write(f"{os.getpid()} {time.time()}\n")
            raise RuntimeError(f"sweep_counting {self.config.tag}: injected attack failure")
        return model


try:
    DEFENCES.names()  # load the built-ins first
    if NAME not in DEFENCES:
        DEFENCES.add(NAME, CountingDefence)
except ValueError:  # the module imported under a second name: keep the first registration
    pass


class CountingApiScorer(TextScorer):
    """Test-only stand-in for an API scorer (``remote = True``): a constant score; every call
    appends the scoring process's pid to ``$SWEEP_TEST_DIR/api_scorer.pids``."""

    kind = "harm"
    remote = True

    class Config(ComponentConfig):
        value: float = 0.5

    def __init__(self, config=None):
        super().__init__(config)
        self.stats = {"requests": 0}

    def score(self, prompts, generations):
        counter_dir().mkdir(parents=True, exist_ok=True)
        with open(counter_dir() / "api_scorer.pids", "a") as fh:
            fh.write(f"{os.getpid()}\n")
        self.stats["requests"] += len(generations)
        return [self.config.value] * len(generations)

    def provenance(self):
        return {"scorer": self.registry_name, "requests": self.stats["requests"]}


try:
    if API_NAME not in METRICS:
        METRICS.add(API_NAME, CountingApiScorer)
except ValueError:
    pass


# ---- one Ray for the session ---------------------------------------------------------------
_RAY: dict = {}


def start_ray(tmp_root: Path) -> dict:
    """Start Ray once (2 CPUs, 2 fake GPUs) with this folder importable and the test counters and
    caches under ``tmp_root``; later calls return the same cluster."""
    if _RAY:
        return _RAY
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["SWEEP_TEST_DIR"] = str(tmp_root / "counters")
    os.environ.setdefault("HARNESS_CACHE", str(tmp_root / "cache"))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    os.environ.pop("RAY_ADDRESS", None)
    t = time.time()
    ctx = ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024,
                   log_to_driver=False)
    _RAY.update(address=ctx.address_info["address"], started_s=time.time() - t, root=tmp_root)
    return _RAY


class RefusalSFTDefence(Defence):
    """Test-only defence that really trains: SFT on the refusals of the defence data (one-GPU or FSDP)."""

    needs_data = True

    class Config(TrainConfig):
        lr: float = 1e-3
        samples: int = 8
        batch_size: int = 4
        max_length: int = 48
        dataset: DatasetRef = DatasetRef(name="smoke")

    def apply(self, model, tokenizer, data, ctx):
        from harness.lib import training
        from harness.lib.text import batches, sft_batch

        rows = [ex for ex in data if ex.refusal]
        tensors = [sft_batch(tokenizer, [e.prompt for e in chunk], [e.refusal for e in chunk],
                             self.config.max_length).to(ctx.device)
                   for chunk in batches(rows, self.config.batch_size)]

        def loss_fn(m, b):
            return m(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss

        training.train_loop(model, tensors, self.config, ctx, loss_fn=loss_fn, desc="defence sft")
        return model


try:
    if SFT_NAME not in DEFENCES:
        DEFENCES.add(SFT_NAME, RefusalSFTDefence)
except ValueError:
    pass


# ---- FSDP without Ray (torch.multiprocessing, gloo) ----------------------------------------
def fsdp_spawn_target(rank: int, world: int, port: int, config: dict, results: str, same_rows: bool = False) -> None:
    """One rank of a 2-process gloo FSDP run of ``harness.sweep.fsdp.fsdp_worker``. ``same_rows``: every
    rank trains on all rows (in slices of batch // world), so the averaged gradient equals the
    one-process gradient on those slices (an exact check for defences that shuffle their data)."""
    import json

    import torch
    import torch.distributed as dist

    if same_rows:
        import harness.sweep.fsdp

        harness.sweep.fsdp.shard_rows = lambda rows, world, rank, batch: (list(rows), max(1, batch // world))

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        from harness.sweep.fsdp import fsdp_worker

        out = fsdp_worker(config, rank, world, torch.device("cpu"))
        Path(results, f"rank{rank}.json").write_text(json.dumps(out, default=str))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
