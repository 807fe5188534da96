"""The sweep driver's view of its run: per-stage state (``OUTPUT/_sweep/state.json``, read by
``harness status``), the time left, and the live progress display (one line per stage kind on a
terminal, a log line whenever the counts change elsewhere)."""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Optional, TextIO

from harness.lib.store import atomic_write_json
from harness.sweep.dag import Sweep
from harness.sweep.grid import format_seconds

STATE_FILE = "state.json"


class SweepProgress:
    """State and progress of a sweep run (the base of ``harness.sweep.runner.SweepRunner``)."""

    sweep: Sweep
    state: dict[str, Any]
    capacity: tuple[float, float]
    progress: bool
    stream: TextIO
    tty: bool
    state_interval: float
    progress_interval: float

    def _init_progress(self) -> None:
        self.state = {}
        self._last_state = 0.0
        self._last_progress = 0.0
        self._last_line = ""
        self._drawn = 0

    # ---- state -------------------------------------------------------------------------------
    def _init_state(self, finished: set[str], todo: set[str], address: Optional[str]) -> None:
        sw = self.sweep
        stages = {}
        for st in sw.stages.values():
            stages[st.id] = {"kind": st.kind, "label": st.label, "status": "pending" if st.id in todo else "skipped",
                             "attempts": 0, "started_at": None, "ended_at": None, "seconds": None,
                             "estimate_s": round(st.estimate_s, 2), "gpus": st.resources.total_gpus,
                             "cells": len(st.cells), "host": None, "error": None}
        self.state = {"version": 1, "name": sw.name, "preset": sw.preset, "output": str(sw.output),
                      "storage": str(sw.storage), "status": "running",
                      "driver": {"pid": os.getpid(), "host": socket.gethostname(), "address": address,
                                 "started_at": time.time()},
                      "updated_at": time.time(), "cells": {"total": len(sw.cells), "finished_before": len(finished)},
                      "stages": stages, "counts": {}, "eta_s": None}

    def write_state(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_state < self.state_interval:
            return
        self._last_state = now
        self.state["updated_at"] = now
        self.state["counts"] = self.counts()
        self.state["eta_s"] = self.eta()
        self.state["elapsed_s"] = round(now - self.state["driver"]["started_at"], 1)
        atomic_write_json(self.sweep.state_dir / STATE_FILE, self.state)

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for s in self.state["stages"].values():
            k = out.setdefault(s["kind"], {"total": 0, "done": 0, "running": 0, "pending": 0, "failed": 0, "skipped": 0})
            k["total"] += 1
            status = s["status"]
            k[{"cancelled": "failed"}.get(status, status)] += 1
        return out

    def eta(self) -> Optional[float]:
        """Seconds left: remaining work (cost-model estimates rescaled per stage kind by the observed
        durations) over the cluster's GPUs (or CPUs), and at least the longest remaining chain."""
        stages = self.state["stages"]
        ratios: dict[str, list[float]] = {}
        for s in stages.values():
            if s["status"] == "done" and s["seconds"] and s["estimate_s"]:
                ratios.setdefault(s["kind"], []).append(s["seconds"] / s["estimate_s"])
        every = sorted(r for rs in ratios.values() for r in rs)
        default = every[len(every) // 2] if every else 1.0

        def calib(kind: str) -> float:
            rs = sorted(ratios.get(kind, []))
            return rs[len(rs) // 2] if rs else default

        now = time.time()
        left: dict[str, float] = {}
        gpu_work = cpu_work = 0.0
        for sid, s in stages.items():
            if s["status"] in ("pending", "running"):
                d = s["estimate_s"] * calib(s["kind"])
                if s["status"] == "running" and s["started_at"]:
                    d = max(d - (now - s["started_at"]), 0.05 * d)
                left[sid] = d
                if s["gpus"]:
                    gpu_work += d * s["gpus"]
                else:
                    cpu_work += d
        if not left:
            return 0.0
        # longest remaining chain
        chain: dict[str, float] = {}
        children = self.sweep.children()
        for sid in reversed(list(self.sweep.stages)):
            if sid in left:
                chain[sid] = left[sid] + max((chain.get(c, 0.0) for c in children[sid]), default=0.0)
        cap_g, cap_c = max(self.capacity[0], 1e-9), max(self.capacity[1], 1.0)
        return round(max(gpu_work / cap_g if gpu_work else 0.0, cpu_work / cap_c, max(chain.values())), 1)

    def progress_line(self) -> str:
        parts = []
        for kind, k in self.counts().items():
            active = k["total"] - k["skipped"]
            bit = f"{kind} {k['done']}/{active} done"
            if k["running"]:
                bit += f", {k['running']} running"
            if k["pending"]:
                bit += f", {k['pending']} pending"
            if k["failed"]:
                bit += f", {k['failed']} failed"
            parts.append(bit)
        elapsed = time.time() - self.state["driver"]["started_at"]
        return (f"[sweep {self.sweep.name}] " + " | ".join(parts) +
                f" | {format_seconds(elapsed)} elapsed, ~{format_seconds(self.eta())} left")

    def progress_block(self) -> list[str]:
        """The live display on a terminal: one line per stage kind, then elapsed and time left."""
        lines = []
        for kind, k in self.counts().items():
            lines.append(f"  {kind:<11} {k['done']:>4}/{k['total'] - k['skipped']:<4} done {k['running']:>3} running "
                         f"{k['pending']:>4} pending {k['failed']:>3} failed")
        elapsed = time.time() - self.state["driver"]["started_at"]
        lines.append(f"[sweep {self.sweep.name}] {format_seconds(elapsed)} elapsed, ~{format_seconds(self.eta())} left")
        return lines

    def show_progress(self, force: bool = False) -> None:
        if not self.progress:
            return
        now = time.time()
        if not force and now - self._last_progress < self.progress_interval:
            return
        if self.tty:
            block = self.progress_block()
            up = f"\x1b[{self._drawn}F" if self._drawn else ""
            self.stream.write(up + "".join("\x1b[2K" + line + "\n" for line in block))
            self._drawn = len(block)
            self._last_progress = now
            self.stream.flush()
            return
        line = self.progress_line()
        if not force and line.split(" | ")[:-1] == self._last_line.split(" | ")[:-1]:
            return  # nothing changed but the clock
        self._last_progress = now
        self._last_line = line
        self.stream.write(line + "\n")
        self.stream.flush()
