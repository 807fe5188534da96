"""The typed, versioned result record: migration of old records, refusal of others, the JSON schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from pydantic import BaseModel

from harness.api import record as R
from harness.api.record import SCHEMA_VERSION, RecordError, TrialRecord
from harness.cli import main
from harness.cli.schema import schema_text

ROOT = Path(__file__).resolve().parent.parent
V1_FIXTURE = ROOT / "tests" / "fixtures" / "leaderboard" / "real_tiny_record.json"
SCHEMA_FILE = ROOT / "docs" / "record.schema.json"


def test_v1_record_is_migrated():
    """A record written by the first harness version (schema 1) reads through the explicit migration."""
    raw = json.loads(V1_FIXTURE.read_text())
    assert raw["schema_version"] == 1 and "evaluation" not in raw
    rec = TrialRecord.read(V1_FIXTURE)
    assert rec.schema_version == SCHEMA_VERSION
    assert rec.evaluation == "harmfulness"  # the score its phases hold
    assert rec.owner == {} and rec.attempts == []
    assert (rec.trial_id, rec.status, rec.seed) == (raw["trial_id"], "ok", 0)
    assert (rec.defence, rec.attack) == ("none", "harmfulqa")
    assert rec.config == raw["config"] and rec.criteria == raw["criteria"]
    assert rec.summary("post_attack").mean == raw["scores"]["post_attack"]["harmfulness"]["mean"]
    assert rec.train["attack"].final_loss == raw["train"]["attack"]["final_loss"]
    assert rec.model.id == raw["model"]["id"] and rec.samples_file == raw["samples_file"]
    # migrated, then written and read again: the same record
    assert TrialRecord.from_json(json.loads(json.dumps(rec.to_json()))) == rec


def test_v1_evaluation_from_scores_or_attack():
    base = {"schema_version": 1, "trial_id": "t", "status": "error", "config": {"attack": {"name": "toxicity"}}}
    assert TrialRecord.from_json(base).evaluation == "toxicity"  # no scores: the attack's name
    base["config"]["attack"]["name"] = "harmfulqa"
    assert TrialRecord.from_json(base).evaluation == "harmfulness"
    scored = {**base, "config": {"attack": {"name": "my_plugin"}},
              "scores": {"pre_attack": {"toxicity": {"mean": 0.1}}, "post_attack": {}}}
    assert TrialRecord.from_json(scored).evaluation == "toxicity"  # the score the record holds
    assert not TrialRecord.from_json({**base, "skipped": True}).skipped  # an in-memory flag is dropped


@pytest.mark.parametrize("content, words", [
    (json.dumps({"schema_version": SCHEMA_VERSION + 1, "trial_id": "t", "config": {}}),
     f"schema version {SCHEMA_VERSION + 1} is newer than this harness reads"),
    ("[1, 2, 3]", "must be a JSON object, got list"),
    ('"a string"', "must be a JSON object, got str"),
    (json.dumps({"trial_id": "t", "config": {}}), "'schema_version' = None: must be an integer"),
    (json.dumps({"schema_version": 0, "trial_id": "t", "config": {}}), "schema version 0 cannot be migrated"),
    (json.dumps({"schema_version": SCHEMA_VERSION, "trial_id": "t", "config": {}, "colour": "red"}),
     "field 'colour': Extra inputs are not permitted"),
    ('{"schema_version": 2, "trial', "not valid JSON"),
])
def test_other_records_are_refused_in_one_line_naming_the_file(tmp_path, content, words):
    path = tmp_path / "rec.json"
    path.write_text(content)
    with pytest.raises(RecordError) as exc:
        TrialRecord.read(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: ") and words in message and "\n" not in message
    assert exc.value.path == path and exc.value.reason == message[len(f"{path}: "):]


def _models(model: type[BaseModel], seen: set) -> None:
    if model in seen:
        return
    seen.add(model)
    for f in model.model_fields.values():
        for arg in _types(f.annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                _models(arg, seen)


def _types(annotation):
    yield annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        yield from _types(arg)


def test_every_field_has_a_docstring():
    models: set = set()
    _models(TrialRecord, models)
    _models(R.ScoreSummary, models)  # the shape of a harm/toxicity payload (``TrialRecord.summary``)
    assert {m.__name__ for m in models} >= {"TrialRecord", "ScoreSummary", "TrainStats", "Sample", "ModelInfo",
                                            "CheckpointInfo", "ErrorInfo", "Scores", "Attempt"}
    missing = [f"{m.__name__}.{name}" for m in models for name, f in m.model_fields.items()
               if not (f.description or "").strip()]
    assert not missing, f"fields without a docstring: {missing}"
    assert all((m.__doc__ or "").strip() for m in models)


def test_committed_schema_is_what_harness_schema_writes(tmp_path, capsys):
    out = tmp_path / "record.schema.json"
    assert main(["schema", "--out", str(out)]) == 0
    assert out.read_text() == schema_text()
    assert SCHEMA_FILE.read_text() == schema_text(), "docs/record.schema.json is stale: run " \
                                                     "`harness schema --out docs/record.schema.json`"
    capsys.readouterr()
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == R.json_schema()


def test_records_validate_against_the_schema():
    schema = json.loads(SCHEMA_FILE.read_text())
    assert f"version {SCHEMA_VERSION}" in schema["title"]
    rec = TrialRecord.read(V1_FIXTURE).to_json()
    jsonschema.validate(rec, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**rec, "status": "finished"}, schema)


def test_skipped_is_never_written():
    rec = TrialRecord(trial_id="t", config={})
    rec.skipped = True
    assert rec.skipped and "skipped" not in rec.to_json()
    assert not TrialRecord.from_json(rec.to_json()).skipped
