"""The typed, versioned result of one trial: ``TrialRecord``.

Every trial (``harness run``, a sweep cell, a nightly suite cell) writes exactly one record,
``results/<trial_id>.json``; every reader (tables, plots, nightly comparison, ``harness status``,
the CLI summary) reads it back through ``TrialRecord.from_json``, never as a plain dict.

Versioning: ``SCHEMA_VERSION`` is bumped whenever a field changes meaning or shape. Older
records are upgraded by an explicit migration (``MIGRATIONS``: version -> function of the JSON
object); a record newer than this harness, or one no migration reaches, is refused with
``RecordError`` naming the file and the versions. The JSON schema of the current version is
written by ``harness schema`` to ``docs/record.schema.json``.

Shapes are strict where readers depend on them (status, ids, config, the score summaries) and
open (extra keys kept) where components add their own details (scorer provenance, evaluation
payloads, training statistics).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from harness.api.errors import HarnessError

SCHEMA_VERSION = 2

Status = Literal["running", "ok", "error", "diverged", "oom", "interrupted"]
FINISHED: tuple[str, ...] = ("ok", "diverged")
"""Statuses a rerun skips: the trial reached an answer (``diverged`` is deterministic)."""

PHASES: tuple[str, ...] = ("pre_attack", "post_attack")


class RecordError(HarnessError):
    """A record that cannot be read as a ``TrialRecord`` (damaged, not an object, wrong version).

    The message is one line that starts with the file (or ``where``); ``path`` is the file when the
    record was read from one, and ``reason`` the message without it (for a table's footnote)."""

    def __init__(self, message: str, path: Optional[Path] = None):
        super().__init__(message)
        self.path = path

    @property
    def reason(self) -> str:
        text = str(self)
        prefix = f"{self.path}: "
        return text[len(prefix):] if self.path is not None and text.startswith(prefix) else text


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class ScoreSummary(_Open):
    """How harmful (or toxic) the generations of one phase were, as scored by one text scorer."""

    mean: Optional[float] = None
    """Mean per-prompt score in [0, 1] (empty generations score 0, as in the reference)."""
    std: Optional[float] = None
    """Population standard deviation of the per-prompt scores."""
    frac_harmful: Optional[float] = None
    """Fraction of prompts whose score is strictly above 0.5."""
    frac_empty: Optional[float] = None
    """Fraction of prompts whose generation is empty or whitespace only."""
    n: int = 0
    """Number of prompts scored."""
    scorer: dict[str, Any] = Field(default_factory=dict)
    """Provenance of the scorer (registry name, model id and source, ``fallback_from`` if swapped)."""
    max_new_tokens: Optional[int] = None
    """Generation length used for this phase."""


class TrainStats(_Open):
    """What a training stage (defence or attack) did."""

    steps: Optional[int] = None
    """Optimizer steps taken."""
    micro_steps: Optional[int] = None
    """Forward/backward passes (steps x gradient accumulation)."""
    seconds: Optional[float] = None
    """Wall time of the training loop."""
    first_loss: Optional[float] = None
    """Loss of the first step."""
    final_loss: Optional[float] = None
    """Loss of the last step."""
    losses: list[Optional[float]] = Field(default_factory=list)
    """Loss per optimizer step (possibly thinned for long runs)."""
    precision: Optional[dict[str, Any]] = None
    """How the stage kept its numbers: ``mode`` (``mixed``: float32 master weights and optimizer
    state with ``compute``-dtype matmuls under autocast; ``pure``: one dtype throughout),
    ``weights``, ``compute``, ``optimizer_state`` (``float32``, ``bfloat16``, ``8bit``, ``paged_8bit``)."""
    memory: Optional[dict[str, Any]] = None
    """The memory plan the stage followed (``harness.lib.memory.StagePlan``: ``gpus``,
    ``gradient_checkpointing``, ``micro_batch`` x ``accumulation``, the estimate ``memory_gb`` by
    part) and ``peak_gb``, the measured peak of allocated GPU memory (``None`` on CPU)."""


class Sample(_Open):
    """One scored generation."""

    prompt: str
    """The question as drawn from the evaluation set (before templating)."""
    generation: str
    """The model's continuation (new tokens only)."""
    score: Optional[float] = None
    """The scorer's value for this generation."""


class ModelInfo(_Open):
    """The base model the trial started from."""

    id: str
    """Hub id or folder as the spec named it."""
    source: str
    """Where it was loaded from: ``hub``, ``local`` or a named fallback (e.g. ``wheel``)."""
    path: Optional[str] = None
    """The resolved folder or file."""
    fallback: Optional[str] = None
    """Why a fallback source was used instead of the hub, if one was."""
    parameters: Optional[int] = None
    """Parameter count."""
    dtype: Optional[str] = None
    """Dtype the model ran in."""


class CheckpointInfo(_Open):
    """The defended checkpoint the trial used (shared by every attack on the same defence key)."""

    key: str
    """Defence key: hash of the model, defence config, defence data and seed."""
    path: str
    """Folder of the checkpoint."""
    reused: bool = False
    """Whether an earlier trial had already trained it."""
    train: Optional[TrainStats] = None
    """Training statistics of the defence (copied from the checkpoint's marker when reused)."""


class ErrorInfo(_Open):
    """Why a trial did not finish with ``ok``."""

    type: str
    """Exception class, or ``OutOfMemory``, ``Interrupted``."""
    stage: Optional[str] = None
    """Pipeline stage that failed (``setup``, ``data``, ``defence``, ``pre_attack``, ``attack``, ...)."""
    message: str = ""
    """One-line message, secrets redacted."""


class Scores(_Open):
    """Scores by phase. Each phase maps an evaluation name (``harmfulness``, ``toxicity``,
    ``capability``, ``trainability``, ...) to that evaluation's payload."""

    base: dict[str, Any] = Field(default_factory=dict)
    """Extra evaluations of the undefended base model (the reference for stability/trainability)."""
    pre_attack: dict[str, Any] = Field(default_factory=dict)
    """Evaluations of the defended model before the attack."""
    post_attack: dict[str, Any] = Field(default_factory=dict)
    """Evaluations of the attacked model."""


class Attempt(_Open):
    """An earlier run of the same trial that did not replace this record's result."""

    status: str
    """Status that attempt ended with."""
    started_at: Optional[str] = None
    """When it started (UTC, ISO 8601)."""
    finished_at: Optional[str] = None
    """When it ended (UTC, ISO 8601)."""
    error: Optional[ErrorInfo] = None
    """Its error, if any."""


class TrialRecord(_Closed):
    """The result of one defence x attack trial (one grid cell)."""

    schema_version: int = SCHEMA_VERSION
    """Version of this schema the record was written with."""
    trial_id: str
    """Id of the trial: readable prefix plus a hash of the full validated config."""
    status: Status = "running"
    """``running`` while a process works on it, then ``ok``, ``error``, ``diverged``, ``oom`` or
    ``interrupted`` (SIGINT/SIGTERM)."""
    error: Optional[ErrorInfo] = None
    """Why the trial failed (``None`` when ``ok``)."""
    config: dict[str, Any]
    """The full canonical run spec (preset, model, defence, attack, eval, seed, ...)."""
    seed: int = 0
    """Random seed of the trial."""
    evaluation: str = "harmfulness"
    """The evaluation that fits the attack's harm domain and that tables headline."""
    started_at: Optional[str] = None
    """When the trial started (UTC, ISO 8601)."""
    finished_at: Optional[str] = None
    """When it ended (UTC, ISO 8601)."""
    owner: dict[str, Any] = Field(default_factory=dict)
    """The process that wrote a ``running`` record: ``pid``, ``host``, ``heartbeat`` (for status)."""
    environment: dict[str, Any] = Field(default_factory=dict)
    """Harness version, Python, package versions, git commit, device, hostname."""
    timings: dict[str, float] = Field(default_factory=dict)
    """Seconds per stage (``load_model_s``, ``defence_s``, ``attack_s``, ``total_s``, ...)."""
    model: Optional[ModelInfo] = None
    """The base model."""
    data: Optional[dict[str, Any]] = None
    """Per role (defence, attack, eval): dataset, rows drawn, fingerprint; synthesized texts."""
    defence_checkpoint: Optional[CheckpointInfo] = None
    """The defended checkpoint (``None`` for ``none``)."""
    scores: Scores = Field(default_factory=Scores)
    """Evaluation results by phase."""
    criteria: dict[str, Any] = Field(default_factory=dict)
    """The immunization criteria measured: ``resistance`` (``post_attack_mean``: harm after the attack,
    the value resistance is judged on; the leaderboard compares it with the undefended model under
    the same attack; ``pre_attack_mean`` and ``increase`` = post - pre only describe the attack),
    ``stability`` (``mean_gain``: capability change against the base model, > 0 better),
    ``trainability`` (``<rouge>_delta``: ROUGE change against the base model), ``generalization``
    (defence and attack data, ``cross_domain``)."""
    train: dict[str, TrainStats] = Field(default_factory=dict)
    """Training statistics by stage (``defence``, ``attack``)."""
    samples: dict[str, list[Sample]] = Field(default_factory=dict)
    """The first ``eval.save_generations`` scored generations of each phase."""
    samples_file: Optional[str] = None
    """All scored generations, relative to the results folder (JSON lines, one per prompt and phase)."""
    notes: list[str] = Field(default_factory=list)
    """Anything that changes how to read the numbers: fallbacks, substitutions, reused stages."""
    plan: Optional[dict[str, Any]] = None
    """The pre-flight's memory plan for the trial (``harness.lib.memory.MemoryPlan``): ``device``,
    the visible ``gpus``, ``precision``, and per stage (``defence``, ``attack``, ``evaluation``) the
    GPUs, gradient checkpointing, micro-batch and the estimate per GPU by part; ``None`` in records
    written before it existed."""
    attempts: list[Attempt] = Field(default_factory=list)
    """Earlier runs of this trial that ended without replacing the result (kept, never lost)."""

    _skipped: bool = PrivateAttr(default=False)

    # ----------------------------------------------------------------- convenience for readers
    @property
    def skipped(self) -> bool:
        """In memory only, never written: ``True`` when a run found this trial already finished and
        returned its stored record instead of running it again."""
        return self._skipped

    @skipped.setter
    def skipped(self, value: bool) -> None:
        self._skipped = bool(value)

    @property
    def finished(self) -> bool:
        """Whether the trial reached an answer a rerun would skip (status in ``FINISHED``)."""
        return self.status in FINISHED

    @property
    def defence(self) -> str:
        """Registry name of the defence (``?`` when the config does not say)."""
        return str((self.config.get("defence") or {}).get("name", "?"))

    @property
    def attack(self) -> str:
        """Registry name of the attack (``?`` when the config does not say)."""
        return str((self.config.get("attack") or {}).get("name", "?"))

    def phase(self, phase: str) -> dict[str, Any]:
        """The evaluations of one phase (``base``, ``pre_attack``, ``post_attack``); ``{}`` if none."""
        value = getattr(self.scores, phase, None)
        return value if isinstance(value, dict) else {}

    def summary(self, phase: str, name: Optional[str] = None) -> Optional[ScoreSummary]:
        """The score summary of ``name`` (default: the headline evaluation) in ``phase``."""
        value = self.phase(phase).get(name or self.evaluation)
        if not isinstance(value, dict):
            return None
        return ScoreSummary.model_validate(value)

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``results/<trial_id>.json`` (what ``from_json`` reads back)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: Any, where: str = "record") -> "TrialRecord":
        """Validate ``data`` (a parsed JSON object), migrating older schema versions.

        Raises ``RecordError`` with one line naming ``where`` for anything else."""
        if not isinstance(data, dict):
            raise RecordError(f"{where}: a record must be a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise RecordError(f"{where}: 'schema_version' = {version!r}: must be an integer (current {SCHEMA_VERSION})")
        if version > SCHEMA_VERSION:
            raise RecordError(f"{where}: schema version {version} is newer than this harness reads "
                              f"({SCHEMA_VERSION}); upgrade ftdefence-harness to read it")
        data = dict(data)
        original = data["schema_version"]
        while data["schema_version"] < SCHEMA_VERSION:
            step = MIGRATIONS.get(data["schema_version"])
            if step is None:
                raise RecordError(f"{where}: schema version {data['schema_version']} cannot be migrated "
                                  f"(known: {sorted(MIGRATIONS)} -> {SCHEMA_VERSION}); rerun the trial")
            data = step(data)
        if original < SCHEMA_VERSION and isinstance(data.get("notes", []), list):  # said, never silent
            data["notes"] = [*data.get("notes", []), f"record: read from schema version {original}, "
                                                     f"migrated to {SCHEMA_VERSION}"]
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first.get("loc", ())) or "(root)"
            raise RecordError(f"{where}: field '{loc}': {first.get('msg')} "
                              f"({exc.error_count()} problem(s) in all)") from None

    @classmethod
    def read(cls, path: str | Path) -> "TrialRecord":
        """Read and validate one record file; ``RecordError`` names the file on any problem."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except IsADirectoryError:
            raise RecordError(f"{path}: is a directory, not a record file", path) from None
        except UnicodeDecodeError as exc:
            raise RecordError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})", path) from None
        except OSError as exc:
            raise RecordError(f"{path}: cannot be read ({type(exc).__name__}: {exc.strerror or exc})", path) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})", path) from None
        try:
            return cls.from_json(data, where=str(path))
        except RecordError as exc:
            exc.path = path
            raise


# ----------------------------------------------------------------------------- migrations
def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 (first release): plain dicts. Adds ``evaluation`` (read from which score the
    post- or pre-attack phase holds, else from the attack's name), ``owner`` and ``attempts``;
    drops the in-memory ``skipped`` flag if a record carried it."""
    out = {k: v for k, v in data.items() if k != "skipped"}
    scores = out.get("scores") or {}
    evaluation = None
    for phase in ("post_attack", "pre_attack"):
        names = (scores.get(phase) or {}).keys()
        for candidate in ("toxicity", "harmfulness"):
            if candidate in names:
                evaluation = candidate
                break
        if evaluation:
            break
    if evaluation is None:
        attack = ((out.get("config") or {}).get("attack") or {}).get("name")
        evaluation = "toxicity" if attack == "toxicity" else "harmfulness"
    out["evaluation"] = evaluation
    out.setdefault("owner", {})
    out.setdefault("attempts", [])
    out["schema_version"] = 2
    return out


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2}
"""Schema version -> function upgrading a JSON object of that version by one version."""


def json_schema() -> dict[str, Any]:
    """The JSON schema of the current ``TrialRecord`` (what ``harness schema`` writes)."""
    schema = TrialRecord.model_json_schema()
    schema["$id"] = f"https://ftdefence-harness/record.schema.v{SCHEMA_VERSION}.json"
    schema["title"] = f"TrialRecord (schema version {SCHEMA_VERSION})"
    return schema
