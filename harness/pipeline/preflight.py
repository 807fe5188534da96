"""Hub pre-flight: every hub asset a trial will read resolves, checked before any training.

When the Hugging Face hub is reachable (``harness.lib.network.hub_reachable``), ``hub_checks``
asks the hub, without downloading data or weights, whether

* the model and every scorer's classifier (a component config field ``model``) resolve, with a
  tokenizer (``config.json`` and ``tokenizer_config.json`` in the repository);
* every hub dataset a dataset loader names resolves with the split and the fields it reads (a
  loader's ``hub_requirements()``: repository, configuration, split, fields; ``datasets``'
  ``load_dataset_builder`` reads only metadata);
* every lm-eval task of the ``capability`` evaluation (groups expanded to their tasks) has a
  dataset that current ``datasets`` can load (a script-based dataset fails here, as it would after
  the defence and the attack) and the columns its prompt templates use.

Offline it returns no problems and one note ("hub unreachable: not checked"): a run then fails,
as before, where a loader needs the hub. ``harness run`` stops on the problems with one line each.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Iterable, Optional

from pydantic import BaseModel

from harness.api.components import DatasetRef
from harness.api.config import RunSpec
from harness.api.registry import DATASETS, METRICS
from harness.lib.network import hub_reachable

log = logging.getLogger("harness.preflight")

# a repo id: owner/name (a local folder or a bare name is not checked)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
JINJA_NAME = re.compile(r"{{\s*([A-Za-z_]\w*)")


def _refs(obj: Any) -> Iterable[DatasetRef]:
    if isinstance(obj, DatasetRef):
        yield obj
    elif isinstance(obj, BaseModel):
        for key in type(obj).model_fields:
            yield from _refs(getattr(obj, key))
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _refs(value)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _refs(value)


def model_ids(spec: RunSpec) -> list[tuple[str, str, Optional[str]]]:
    """``(field, hub id, revision)`` of the model and of every scorer/evaluation's ``model``."""
    out = []
    if HUB_ID.match(spec.model.id):
        out.append(("model.id", spec.model.id, spec.model.revision))
    for key in ("harm_scorer", "toxicity_scorer"):
        cfg = getattr(spec.eval, key).config
        mid = getattr(cfg, "model", None)
        if isinstance(mid, str) and HUB_ID.match(mid):
            out.append((f"eval.{key}.model", mid, getattr(cfg, "revision", None)))
    return out


def dataset_requirements(spec: RunSpec) -> list[dict[str, Any]]:
    """What each dataset loader of ``spec`` reads from the hub (its ``hub_requirements()``)."""
    configs = [("defence", spec.defence.config), ("attack", spec.attack.config)]
    configs += [(f"eval.params.{n}", spec.evaluation_config(n)) for n in spec.eval.extra]
    out, seen = [], set()
    for field, cfg in configs:
        for ref in _refs(cfg):
            cls = DATASETS.get(ref.name)
            loader = cls(cls.Config(**ref.params()))
            if hasattr(loader, "hub_requirements"):
                reqs = loader.hub_requirements()
            else:  # a loader with a hub_id and no local path reads that split (fields: its hub_fields trait)
                c = loader.config
                hub = getattr(c, "hub_id", None)
                reqs = [] if getattr(c, "path", None) or not hub else [
                    {"repo": hub, "name": None, "split": getattr(c, "split", None),
                     "fields": list(getattr(cls, "hub_fields", ()))}]
            for req in reqs:
                key = (req["repo"], req.get("name"), req.get("split"))
                if key not in seen:
                    seen.add(key)
                    out.append({**req, "field": field})
    return out


def template_fields(cfg: dict[str, Any]) -> list[str]:
    """The dataset columns a task's prompt templates read: names a Jinja ``{{ }}`` starts with (less
    the template's own ``{% set %}`` variables), or a bare column name."""
    names: set[str] = set()
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        value = cfg.get(key)
        if not isinstance(value, str) or value.startswith("!function"):
            continue
        if "{{" in value:
            local = set(re.findall(r"{%-?\s*set\s+([A-Za-z_]\w*)", value))
            names |= {m for m in JINJA_NAME.findall(value) if m not in local}
        elif re.fullmatch(r"[A-Za-z_]\w*", value):
            names.add(value)
    return sorted(names)


def _task_configs(tm, names: list[str]) -> Iterable[tuple[str, dict[str, Any]]]:
    """``(task, config)`` of every task ``names`` stand for (groups and tags expanded), from the
    task index lm-eval builds without loading any dataset."""
    index = getattr(tm, "task_index", None)
    if not isinstance(index, dict):  # an lm-eval older than the floor: nothing to expand here
        return
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop(0)
        if name in seen or name not in index:
            continue
        seen.add(name)
        entry = index[name]
        if isinstance(entry, dict):  # lm-eval 0.4.10-0.4.12: {"type", "yaml_path", "task" (a tag's members)}
            kind = str(entry.get("type", ""))
            if kind == "tag":
                todo += list(entry.get("task") or [])
                continue
            cfg = dict(tm._get_config(name) or {})
        else:  # lm-eval 0.4.13+: Entry(kind, cfg, tags)
            kind = str(getattr(entry, "kind", "")).lower()
            cfg = dict(getattr(entry, "cfg", None) or {})
        if kind.endswith("tag"):
            todo += [n for n, e in index.items() if name in (getattr(e, "tags", None) or ())]
        elif kind.endswith("group"):
            members = cfg.get("task") or []
            todo += [m if isinstance(m, str) else m.get("task", "") for m in (members if isinstance(members, list) else [members])]
        else:
            yield name, cfg


def lm_eval_requirements(spec: RunSpec) -> list[dict[str, Any]]:
    """The hub datasets of the capability evaluation's lm-eval tasks (groups and tags expanded)."""
    if "capability" not in spec.eval.extra:
        return []
    evaluation = METRICS.get("capability")(spec.evaluation_config("capability"))
    out, seen = [], set()
    for task, cfg in _task_configs(evaluation._task_manager(), list(evaluation.config.tasks)):
        path = cfg.get("dataset_path")
        if not path or not HUB_ID.match(str(path)):
            continue  # a local or builder dataset (json, csv, the bundled smoke tasks)
        kwargs = dict(cfg.get("dataset_kwargs") or {})
        kwargs.pop("trust_remote_code", None)
        key = (path, cfg.get("dataset_name"), repr(sorted(kwargs.items())))
        if key in seen:
            continue
        seen.add(key)
        out.append({"repo": path, "name": cfg.get("dataset_name"), "kwargs": kwargs,
                    "split": cfg.get("test_split") or cfg.get("validation_split"),
                    # process_docs rewrites the rows (hellaswag's "query"): the templates read its output
                    "fields": [] if cfg.get("process_docs") else template_fields(cfg),
                    "task": task, "field": "eval.params.capability.tasks"})
    return out


def _check_dataset(req: dict[str, Any], builder: Callable) -> Optional[str]:
    what = f"{req['field']}: hub dataset {req['repo']}" + (f" ({req['name']})" if req.get("name") else "") + \
        (f" for lm-eval task {req['task']}" if req.get("task") else "")
    try:
        b = builder(req["repo"], req.get("name"), **(req.get("kwargs") or {}))
    except Exception as exc:  # noqa: BLE001 - any failure here is the failure the run would hit later
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        return f"{what} cannot be loaded with datasets: {type(exc).__name__}: {first}"
    info = getattr(b, "info", None)
    splits = getattr(info, "splits", None) or {}
    if req.get("split") and splits and req["split"] not in splits:
        return f"{what} has no split {req['split']!r} (it has: {', '.join(sorted(splits))})"
    features = getattr(info, "features", None)
    if features is not None and req.get("fields"):
        missing = [f for f in req["fields"] if f not in features]
        if missing:
            return f"{what} lacks the field(s) {', '.join(missing)} (it has: {', '.join(sorted(features))})"
    return None


def _check_model(field: str, repo: str, revision: Optional[str], file_exists: Callable) -> Optional[str]:
    for name in ("config.json", "tokenizer_config.json"):
        try:
            ok = file_exists(repo, name, revision=revision)
        except Exception as exc:  # noqa: BLE001 - gated, missing, no token
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            return f"{field}={repo!r} does not resolve on the hub: {type(exc).__name__}: {first} (gated models need HF_TOKEN)"
        if not ok:
            return f"{field}={repo!r}: the hub repository has no {name} (not a model with a tokenizer)"
    return None


def hub_checks(spec: RunSpec, *, reachable: Optional[bool] = None, builder: Optional[Callable] = None,
               file_exists: Optional[Callable] = None) -> tuple[list[str], list[str]]:
    """``(problems, notes)`` of every hub asset ``spec`` needs (see the module docstring).
    ``builder``/``file_exists`` replace ``datasets.load_dataset_builder`` and
    ``huggingface_hub.file_exists`` (tests)."""
    if reachable is None:
        reachable = hub_reachable()
    if not reachable:
        return [], ["hub unreachable (or HF_HUB_OFFLINE): hub assets not checked before the run"]
    if builder is None:
        import datasets

        builder = datasets.load_dataset_builder
    if file_exists is None:
        from huggingface_hub import file_exists
    problems, notes = [], []
    for field, repo, revision in model_ids(spec):
        problem = _check_model(field, repo, revision, file_exists)
        problems += [problem] if problem else []
        notes += [] if problem else [f"{field}={repo}: resolves with a tokenizer"]
    reqs = dataset_requirements(spec) + lm_eval_requirements(spec)
    for req in reqs:
        problem = _check_dataset(req, builder)
        problems += [problem] if problem else []
    notes.append(f"{len(reqs)} hub dataset(s) checked")
    for p in problems:
        log.error("pre-flight: %s", p)
    return problems, notes
