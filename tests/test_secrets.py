"""Secrets and safety: API keys come from the environment or a key file and are found in no file,
log line, exception, record or printed output; no remote code; safetensors only; generated text
stays out of INFO logs."""

import ast
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fault_driver
from test_perspective import FakeAPI

ROOT = Path(__file__).resolve().parent.parent
KEY = "AIzaFAKE-scan-me-9f8e7d6c5b4a3210"
TD = fault_driver.TEST_DEFENCE




@pytest.fixture
def api():
    fake = FakeAPI()
    yield fake
    fake.close()


def files_containing(root: Path, needle: str) -> list[str]:
    data = needle.encode()
    return [str(p) for p in Path(root).rglob("*") if p.is_file() and data in p.read_bytes()]


def write_preset(tmp: Path, tiny: Path, api: FakeAPI) -> Path:
    """A toxicity cell on local data, scored by Perspective (the fake API) with a test defence."""
    data = tmp / "data"
    data.mkdir()

    def jsonl(name, rows):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(data / name)

    d = jsonl("defence.jsonl", [{"prompt": f"how do I harm {i}", "response": f"like this {i}",
                                 "refusal": "I cannot help with that."} for i in range(8)])
    a = jsonl("attack.jsonl", [{"prompt": f"continue the rant {i}:", "response": f"you idiot {i}"} for i in range(8)])
    e = jsonl("eval.jsonl", [{"prompt": f"finish this {i}:"} for i in range(6)])
    preset = tmp / "preset.yaml"
    preset.write_text(f"""
model: {{id: {tiny}, dtype: float32}}
seed: 0
defence: {TD}
attack: toxicity
defence_defaults: {{dataset: {{name: local, path: {d}}}, samples: 8, batch_size: 4, max_length: 32}}
attacks:
  toxicity: {{dataset: {{name: local, path: {a}}}, eval_dataset: {{name: local, path: {e}}}, samples: 8,
              batch_size: 4, epochs: 1, max_length: 32, max_new_tokens: 8}}
eval:
  samples: 6
  max_new_tokens: 8
  batch_size: 3
  harm_scorer: {{name: keyword_refusal}}
  toxicity_scorer: {{name: perspective, discovery_url: "{api.discovery_url}", cache_dir: {tmp / 'pcache'},
                    qps: 1000, backoff_base: 0.001, timeout: 5, max_retries: 1}}
""")
    return preset


CLI = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import fault_driver; fault_driver.register(); "
       "from harness.cli import main; sys.exit(main(sys.argv[1:]))")


def cli(args, tmp: Path, **env):
    full_env = {**os.environ, "HARNESS_CACHE": str(tmp / "cache"), "PERSPECTIVE_API_KEY": KEY,
                "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", CLI, str(Path(__file__).parent), *args], env=full_env,
                          capture_output=True, text=True, timeout=300)


def test_perspective_run_and_dry_run_leak_the_key_nowhere(tiny_dir, tmp_path, api, monkeypatch, capsys):
    preset = write_preset(tmp_path, tiny_dir, api)
    out = tmp_path / "results"
    # a full run with debug logging: the Google client logs request URLs (which carry ?key=)
    run = cli(["-v", "run", "--preset", str(preset), "--output", str(out), "--no-progress"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    rec = json.loads(next(out.glob("*.json")).read_text())
    assert rec["status"] == "ok" and "toxicity" in rec["scores"]["post_attack"]
    assert rec["scores"]["post_attack"]["toxicity"]["scorer"]["scorer"] == "perspective"
    assert api.requests and all(r["query"]["key"] == [KEY] for r in api.requests)  # the key was used
    assert (out / "checkpoints").exists() and list((tmp_path / "pcache").rglob("*.json"))
    # the scorer now fails with the key refused (403): the error lands in the record and the logs
    api.script = [403] * 50
    failed = cli(["-v", "run", "--preset", str(preset), "--output", str(tmp_path / "results403"), "--no-progress",
                  "--set", f"eval.toxicity_scorer.cache_dir={tmp_path / 'pcache2'}"], tmp_path)
    assert failed.returncode != 0
    rec403 = json.loads(next((tmp_path / "results403").glob("*.json")).read_text())
    assert rec403["status"] == "error" and "403" in rec403["error"]["message"]
    # dry runs (one cell, and every defence), in this process, with the key in the environment
    from harness.cli import main

    monkeypatch.setenv("PERSPECTIVE_API_KEY", KEY)
    fault_driver.register(monkeypatch)
    assert main(["run", "--preset", str(preset), "--dry-run"]) == 0
    dry = capsys.readouterr()
    assert api.discovery_url in dry.out
    assert main(["run", "--dry-run", "--set", "eval.toxicity_scorer.name=perspective"]) == 0
    dry_all = capsys.readouterr()
    assert TD in dry_all.out and KEY not in dry.out + dry.err + dry_all.out + dry_all.err

    for proc in (run, failed):
        assert KEY not in proc.stdout and KEY not in proc.stderr
    assert "[REDACTED]" in run.stderr or "key=" not in run.stderr
    assert files_containing(tmp_path, KEY) == [], "the API key was written to disk"


def test_exception_carrying_the_key_is_redacted_in_record_logs_and_cli(tiny_dir, tmp_path, monkeypatch, caplog,
                                                                       capsys):
    """Whatever a component's exception carries (the key, or a URL with ?key=), the record, the
    logs and the CLI output show it redacted."""
    from harness.cli import main
    from harness.api.config import resolve
    from harness.api.secrets import read_secret
    from harness.pipeline.trial import run_trial
    from metrics.keyword_refusal import KeywordRefusal

    monkeypatch.setenv("PERSPECTIVE_API_KEY", KEY)
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    assert read_secret("PERSPECTIVE_API_KEY") == KEY  # registers it for redaction

    def leaky(self, prompts, generations):
        raise RuntimeError(f"GET https://api.example/v1/score?alt=json&key={KEY} failed; token {KEY}")

    monkeypatch.setattr(KeywordRefusal, "score", leaky)
    monkeypatch.setattr(KeywordRefusal, "score_details", leaky)  # what the evaluation calls
    caplog.set_level(logging.DEBUG)
    spec = resolve("smoke", model=str(tiny_dir), sets=fault_driver.FAST)
    rec = run_trial(spec, tmp_path / "results", progress=False)
    assert rec.status == "error" and "[REDACTED]" in rec.error.message
    assert KEY not in json.dumps(rec.to_json())
    assert files_containing(tmp_path, KEY) == []
    assert not [r for r in caplog.records if KEY in r.getMessage()]
    # the CLI: summary and error lines
    args = ["run", "--model", str(tiny_dir), "--output", str(tmp_path / "cli"), "--no-progress"]
    for s in fault_driver.FAST:
        args += ["--set", s]
    assert main(args) == 1
    printed = capsys.readouterr()
    assert KEY not in printed.out + printed.err and "[REDACTED]" in printed.out


def test_keys_come_from_env_or_key_file(tmp_path, monkeypatch):
    from harness.api.secrets import read_secret, redact

    monkeypatch.delenv("SOME_TEST_API_KEY", raising=False)
    key_file = tmp_path / "key.txt"
    key_file.write_text("file-secret-abcdef\n")
    assert read_secret("SOME_TEST_API_KEY") is None
    assert read_secret("SOME_TEST_API_KEY", str(key_file)) == "file-secret-abcdef"
    monkeypatch.setenv("SOME_TEST_API_KEY", "env-secret-123456")
    assert read_secret("SOME_TEST_API_KEY", str(key_file)) == "env-secret-123456"  # the environment wins
    text = "a file-secret-abcdef b env-secret-123456 c https://x/y?key=zzz&alt=json"
    assert redact(text) == "a [REDACTED] b [REDACTED] c https://x/y?key=[REDACTED]&alt=json"
    # Perspective reads its key the same way: no config field can hold it
    from harness.api.registry import METRICS

    fields = set(METRICS.get("perspective").Config.model_fields)
    assert {"api_key_env", "key_file"} <= fields and not {"api_key", "key", "token"} & fields


def test_api_key_in_config_is_refused_without_showing_it(capsys):
    from harness.cli import main

    code = main(["run", "--dry-run", "--set", "eval.toxicity_scorer.name=perspective", "--set",
                 f"eval.toxicity_scorer.discovery_url=https://h/rest?version=v1alpha1&key={KEY}"])
    printed = capsys.readouterr()
    assert code == 2 and "eval.toxicity_scorer.discovery_url" in printed.err
    assert KEY not in printed.out + printed.err


# ---- remote code and pickles ------------------------------------------------------------------------
def test_trust_remote_code_is_off_unless_the_spec_turns_it_on(tiny_dir, monkeypatch):
    import transformers

    from harness.api.config import ModelSpec, resolve
    from harness.lib.models import load_model

    calls = []

    def capture(kind):
        def from_pretrained(path, *args, **kwargs):
            calls.append((kind, kwargs))
            raise RuntimeError("stop")
        return from_pretrained

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", capture("tokenizer"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", capture("model"))
    assert resolve("smoke", sets=[fault_driver.FAST[0]]).model.trust_remote_code is False
    for spec, expected in ((ModelSpec(id=str(tiny_dir)), False), (ModelSpec(id=str(tiny_dir), trust_remote_code=True), True)):
        with pytest.raises(RuntimeError, match="stop"):
            load_model(spec)
        kind, kwargs = calls[-1]
        assert kwargs["trust_remote_code"] is expected
    # the model itself, when it gets that far, is loaded from safetensors only
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: object())
    with pytest.raises(RuntimeError, match="stop"):
        load_model(ModelSpec(id=str(tiny_dir)))
    kind, kwargs = calls[-1]
    assert kind == "model" and kwargs["trust_remote_code"] is False and kwargs["use_safetensors"] is True


def _torch_load_calls(path: Path):
    """``(line, source)`` of every torch.load / torch.hub.load_state_dict_from_url call without
    ``weights_only=True``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        if func not in ("torch.load", "torch.hub.load_state_dict_from_url", "load_state_dict_from_url"):
            continue
        kw = {k.arg: k.value for k in node.keywords}
        ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
        if not ok:
            out.append((node.lineno, ast.unparse(node)))
    return out


def _python_sources():
    skip = {".venv", ".git", "build", "dist", "node_modules", "__pycache__", "results"}
    for path in ROOT.rglob("*.py"):
        if not skip & set(path.relative_to(ROOT).parts):
            yield path


def test_torch_load_is_only_called_with_weights_only_true():
    offenders = {}
    for path in _python_sources():
        calls = _torch_load_calls(path)
        if calls:
            offenders[str(path.relative_to(ROOT))] = calls
    assert not offenders, f"torch.load without weights_only=True: {offenders}"
    assert len(list(_python_sources())) > 30  # the scan really saw the repository


def test_defended_checkpoints_are_safetensors(tiny_dir, tmp_path, monkeypatch):
    from harness.api.config import resolve
    from harness.pipeline.trial import run_trial

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    fault_driver.register(monkeypatch)
    spec = resolve("smoke", defence=TD, model=str(tiny_dir), sets=fault_driver.FAULT_SETS)
    assert run_trial(spec, tmp_path / "r", progress=False).status == "ok"
    ck = tmp_path / "r" / "checkpoints" / spec.defence_key()
    names = {p.name for p in ck.iterdir()}
    assert ".complete" in names and any(n.endswith(".safetensors") for n in names)
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    # the reused checkpoint loads again (safetensors path) and gives the same scores
    again = run_trial(spec, tmp_path / "r", progress=False, force=True)
    assert again.defence_checkpoint.reused is True


# ---- generated text stays out of logs -----------------------------------------------------------------
def test_generated_text_is_not_logged_at_info(tiny_dir, tmp_path, monkeypatch, caplog):
    from harness.api.config import resolve
    from harness.pipeline.trial import run_trial

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    fault_driver.register(monkeypatch)
    caplog.set_level(logging.INFO)
    spec = resolve("smoke", defence=TD, model=str(tiny_dir),
                   sets=fault_driver.FAULT_SETS + ["eval.max_new_tokens=16", "synth.max_new_tokens=16"])
    rec = run_trial(spec, tmp_path / "results", progress=False)
    assert rec.status == "ok"
    out = tmp_path / "results"
    texts = [json.loads(line)["generation"] for line in (out / rec.samples_file).read_text().splitlines()]
    for path in (tmp_path / "cache" / "generated").rglob("*.json"):  # synthesised harmful answers/refusals
        texts += list(json.loads(path.read_text()).values())
    texts = [t.strip() for t in texts if len(t.strip()) >= 12]
    assert len(texts) > 10
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert logged  # the run did log
    leaked = [t for t in texts if any(t in m for m in logged)]
    assert not leaked, leaked[:3]
