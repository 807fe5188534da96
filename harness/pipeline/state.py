"""What one trial carries from stage to stage (``Trial``), and how it is opened (``open_trial``).

``open_trial`` does everything that can fail without a model (component configs, API keys, the
model's source, the data draws), so bad input fails in seconds and before any record is written.
Models are loaded lazily: the base model the first time a stage asks for it (``Trial.base_model``),
the defended model through the loader the defence stage leaves (``Trial.model``); a trial whose
defended checkpoint is complete and whose caches hold the synthesised texts never loads the base
model. Loading the base model counts as the ``setup`` stage (its failures are reported there).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from harness.api.components import Example
from harness.api import safeio
from harness.api.config import RunSpec
from harness.api.record import TrialRecord
from harness.lib import data as datamod
from harness.lib.context import StageContext
from harness.lib.checkpoints import save_model
from harness.lib.models import (ModelSource, load_checkpoint, load_model, parameter_count, pick_device, pick_dtype,
                                resolve_source)
from harness.lib.provenance import environment
from harness.pipeline.components import Components

log = logging.getLogger("harness.pipeline")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class TrialPaths:
    """Where a trial writes: records (``output``) and shared checkpoints and caches (``checkpoints``)."""

    output: Path
    checkpoints: Path

    @classmethod
    def of(cls, output, checkpoints=None) -> "TrialPaths":
        output = Path(output)
        return cls(output, Path(checkpoints) if checkpoints else output / "checkpoints")


class BaseModel:
    """The base model of a trial, loaded on first use; several trials on the same model (the
    sweep's data stage) may share one."""

    def __init__(self, spec: RunSpec, source: ModelSource, device: torch.device, dtype: torch.dtype):
        self.spec, self.source, self.device, self.dtype = spec.model, source, device, dtype
        self.loaded: Optional[tuple[Any, Any]] = None
        self.load_seconds: Optional[float] = None
        self._parameters: Optional[int] = None

    def get(self) -> tuple[Any, Any]:
        if self.loaded is None:
            t0 = time.perf_counter()
            model, tokenizer, self.source = load_model(self.spec, self.source, self.device, self.dtype)
            self.load_seconds = round(time.perf_counter() - t0, 2)
            self.loaded = (model, tokenizer)
        return self.loaded

    def release(self) -> None:
        """Forget the loaded model (a defence trained it in place, or a checkpoint replaces it)."""
        self.loaded = None

    def parameters(self) -> int:
        if self._parameters is None:
            if self.loaded is not None:
                self._parameters = sum(p.numel() for p in self.loaded[0].parameters())
            else:
                self._parameters = parameter_count(self.spec, self.source)
        return self._parameters

    def info(self) -> dict[str, Any]:
        """The record's ``model`` entry (also the key of the base model's cached evaluations)."""
        return {**self.source.as_dict(), "parameters": self.parameters(),
                "dtype": str(self.dtype).replace("torch.", "")}


class Trainer:
    """How the training stages (defence, attack) train: in this process, on the trial's device.
    The FSDP worker (``harness.sweep.fsdp``) substitutes one that shards the rows and the model
    over its ranks and gathers the weights to save them."""

    def prepare(self, component, rows: list[Example], model) -> tuple[list[Example], Any]:
        """Called just before ``Defence.apply`` / ``Attack.run``: the rows and model to train."""
        return rows, model

    def stats(self, train: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        """The training summary as the record and the checkpoint marker keep it."""
        return train

    def save_defended(self, trial: "Trial", model, tokenizer, folder: Path, meta: dict[str, Any]) -> None:
        save_defended(trial.comp.defence, model, tokenizer, folder, meta)


def save_defended(defence, model, tokenizer, folder: Path, meta: dict[str, Any]) -> None:
    """The defence's ``save_defended`` hook, or the default checkpoint (``save_model``: whole
    model + completion marker) when the hook returns ``NotImplemented``."""
    if defence.save_defended(model, tokenizer, folder, meta=meta) is NotImplemented:
        save_model(model, tokenizer, folder, meta=meta)


def load_defended(defence, folder: Path, model_spec, device, dtype) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from the defence's ``load_defended`` hook, or the folder loaded as an
    ordinary checkpoint when the hook returns ``NotImplemented``."""
    loaded = defence.load_defended(folder, model_spec, device, dtype)
    return load_checkpoint(model_spec, folder, device, dtype) if loaded is NotImplemented else loaded


def new_record(spec: RunSpec, evaluation: str, device) -> TrialRecord:
    """A ``running`` record of ``spec``, before any stage ran."""
    return TrialRecord(trial_id=spec.trial_id, status="running", config=spec.canonical(), seed=spec.seed,
                       evaluation=evaluation, started_at=now(), environment=environment(device))


class Trial:
    """One trial's state between stages: its spec and components, the record being filled, the
    data, the models (lazily loaded) and the outputs a sweep stage points its marker at."""

    def __init__(self, spec: RunSpec, comp: Components, paths: TrialPaths, *, source: ModelSource,
                 device: torch.device, dtype: torch.dtype, drawn: dict[str, list[Example]], progress: bool = True,
                 cache_pre_attack: bool = False, attacked_from: Optional[Path] = None,
                 trainer: Optional[Trainer] = None, base: Optional[BaseModel] = None):
        self.spec, self.comp, self.paths = spec, comp, paths
        self.source, self.device, self.dtype = source, device, dtype
        self.drawn = drawn
        self.progress = progress
        self.cache_pre_attack = cache_pre_attack
        self.attacked_from = attacked_from
        self.trainer = trainer or Trainer()
        self.base = base or BaseModel(spec, source, device, dtype)
        self.record = new_record(spec, comp.attack.evaluation, device)
        self.record.notes.extend(comp.notes)
        self.ctx = StageContext("setup", seed=spec.seed, device=device, dtype=dtype, workdir=paths.checkpoints,
                                spec=spec, progress=progress)
        self.stage = "setup"  # the stage running now (what an error record names)
        self.parts: dict[str, list[Example]] = {}
        self.base_extras: dict[str, Any] = {}
        self.pre_rows: list[dict] = []
        self.post_rows: list[dict] = []
        self.attacked: Optional[tuple[Any, Any]] = None
        self.outputs: dict[str, Path] = {}  # stage name -> the cache file it wrote or read
        self._model: Optional[tuple[Any, Any]] = None
        self._loader: Optional[Callable[[], tuple[Any, Any]]] = None

    # ---- models -----------------------------------------------------------------------------
    def base_model(self) -> tuple[Any, Any]:
        """``(model, tokenizer)`` of the base model, loaded now if it is not yet (as ``setup``)."""
        if self.base.loaded is None:
            stage, self.stage = self.stage, "setup"
            self.base.get()
            self.stage = stage
            self.record.timings["load_model_s"] = self.base.load_seconds
        return self.base.loaded

    def model(self) -> tuple[Any, Any]:
        """``(model, tokenizer)`` of the model the next stage works on: the defended model (once
        the defence stage ran), else the base model."""
        if self._model is None:
            self._model = self._loader() if self._loader else self.base_model()
        return self._model

    def use(self, model, tokenizer) -> None:
        self._model, self._loader = (model, tokenizer), None

    def use_loader(self, loader: Callable[[], tuple[Any, Any]]) -> None:
        self._model, self._loader = None, loader


def check_paths(paths: TrialPaths) -> None:
    """The results and checkpoints folders can be written (neither is a file, nor under one; names
    fit the file system): checked before any model loads, not when the first file is saved."""
    safeio.check_output_dir(paths.output, "results folder (--output)")
    safeio.check_output_dir(paths.checkpoints, "checkpoints folder (--checkpoints)")


def open_trial(spec: RunSpec, paths: TrialPaths, *, progress: bool = True, cache_pre_attack: bool = False,
               attacked_from: str | Path | None = None, trainer: Optional[Trainer] = None,
               base: Optional[BaseModel] = None, device: Optional[torch.device] = None) -> Trial:
    """Validate and prepare everything that needs no model. Raises on bad input (one line)."""
    check_paths(paths)
    comp = Components.build(spec)
    comp.check_ready()
    source = base.source if base is not None else resolve_source(spec.model)
    device = device or (base.device if base is not None else pick_device(spec.model))
    dtype = pick_dtype(spec.model, device)
    drawn = datamod.draw(comp.requests(), spec.seed, spec.disjoint)
    return Trial(spec, comp, paths, source=source, device=device, dtype=dtype, drawn=drawn, progress=progress,
                 cache_pre_attack=cache_pre_attack, attacked_from=Path(attacked_from) if attacked_from else None,
                 trainer=trainer, base=base)

