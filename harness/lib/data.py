"""Drawing the defence, attack and evaluation examples of a trial: seeded, disjoint, complete.

Each role names a dataset (``defence.dataset``, ``attack.dataset``, ``attack.eval_dataset``).
Roles that read the same dataset (same name and parameters) share one seeded permutation and
take fixed, non-overlapping regions of it: the defence the first ``n_defence`` rows, the attack
the next ``n_attack``, the evaluation the last ``n_eval``. So the defence data depends only on
(dataset, seed, n_defence) — the defended checkpoint can be shared by every attack on it — and
the evaluation prompts are the same for every cell of a sweep. With ``disjoint: true`` the roles
are also checked for shared prompts across different datasets. A dataset's ``selection``
parameter (``harness.lib.datasets.selection``) replaces the permutation by the file order
(``file``) or gives every role the first rows of the file, as the authors' code does
(``reference``, with ``disjoint: false``).

Examples that lack a harmful answer or a refusal where the role needs one are completed by the
base model (see ``harness.lib.synth``), and the record says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, replace
from typing import Any, Optional

from harness.api.components import DatasetRef, Example
from harness.api.config import format_validation_error
from harness.api.errors import DataError
from harness.api.registry import DATASETS, METRICS

log = logging.getLogger(__name__)

ROLE_ORDER = ("defence", "attack", "eval")
ROLE_FIELD = {"defence": "defence.samples", "attack": "attack.samples", "eval": "eval.samples"}


@dataclass(frozen=True)
class Request:
    role: str
    ref: DatasetRef
    n: int
    needs: tuple[str, ...]  # "response", "refusal"


def ref_key(ref: DatasetRef) -> str:
    return json.dumps({"name": ref.name, **ref.params()}, sort_keys=True, default=str)


_LOADED: dict[str, list[Example]] = {}
_TRUNCATED: dict[str, int] = {}  # rows cut to MAX_TEXT_CHARS per loaded dataset (ref_key)


#: longest text kept of one prompt, answer or refusal (characters). A row is cut to this before any
#: tokenizer sees it: no model context holds more (a token is rarely over 8 characters and contexts
#: of 8k tokens are the most any stage uses), and a single 20 MB row would otherwise stall
#: tokenization for minutes. Each cut example is marked ``meta["truncated"]`` (the fields and their
#: original lengths); the data summary of the record counts them per role (``truncated``).
MAX_TEXT_CHARS = 65_536
TEXT_FIELDS = ("prompt", "response", "refusal")


def truncate_long(rows: list[Example], source: str, limit: int = MAX_TEXT_CHARS) -> list[Example]:
    """``rows`` with every text field cut to ``limit`` characters (module constant); a WARNING says
    how many were cut. A field that is not text is an error naming the row."""
    out, cut = [], 0
    for i, ex in enumerate(rows):
        long = {}
        for name in TEXT_FIELDS:
            value = getattr(ex, name)
            if value is not None and not isinstance(value, str):
                where = ex.meta.get("line", i + 1)
                raise DataError(f"{source}: row {where}: field {name!r} is a {type(value).__name__}, not text")
            if value is not None and len(value) > limit:
                long[name] = len(value)
        if long:
            cut += 1
            ex = replace(ex, **{k: getattr(ex, k)[:limit] for k in long},
                         meta={**ex.meta, "truncated": {k: n for k, n in long.items()}})
        out.append(ex)
    if cut:
        log.warning("%s: %d row(s) have a text over %d characters; cut to that length before tokenizing "
                    "(marked in the record's data summary)", source, cut, limit)
    return out


def load_dataset_ref(ref: DatasetRef) -> list[Example]:
    key = ref_key(ref)
    if key not in _LOADED:
        loader = make_loader(ref)
        rows = loader.load()
        if not rows:
            raise DataError(f"dataset {ref.name!r} ({loader.describe_source()}) holds no examples")
        _LOADED[key] = truncate_long(rows, f"dataset {ref.name!r} ({loader.describe_source()})")
        _TRUNCATED[key] = sum(1 for ex in _LOADED[key] if ex.meta.get("truncated"))
    return _LOADED[key]


def make_loader(ref: DatasetRef):
    from pydantic import ValidationError

    cls = DATASETS.get(ref.name)
    try:
        return cls(cls.Config(**ref.params()))
    except ValidationError as exc:
        raise DataError(format_validation_error(exc, prefix=f"dataset {ref.name}", model=cls.Config)) from None


def draw(requests: list[Request], seed: int, disjoint: bool = True) -> dict[str, list[Example]]:
    """The role splits. Each dataset's ``selection`` parameter (``harness.lib.datasets.selection``)
    says how: ``seeded`` (default) and ``file`` give disjoint regions of a seeded permutation or of
    the file order; ``reference`` gives every role the first rows of the file (the authors' draw)."""
    groups: dict[str, list[Request]] = {}
    for req in requests:
        groups.setdefault(ref_key(req.ref), []).append(req)
    out: dict[str, list[Example]] = {}
    for key, reqs in groups.items():
        rows = load_dataset_ref(reqs[0].ref)
        mode, hint = selection_of(reqs[0].ref)
        name = reqs[0].ref.name
        parts = ", ".join(f"{ROLE_FIELD.get(r.role, r.role)}={r.n}" for r in reqs)
        if mode == "reference" and disjoint and len(reqs) > 1:
            raise DataError(f"dataset {name!r} has selection=reference, which gives every role ({parts}) the first rows "
                            "of the file as the authors' code does, so the roles overlap; set disjoint=false (the paper "
                            "preset does) or selection=file/seeded for disjoint roles")
        need = max(r.n for r in reqs) if mode == "reference" else sum(r.n for r in reqs)
        if need > len(rows):
            what = "the largest" if mode == "reference" else "they sum to"
            raise DataError(f"dataset {name!r} holds {len(rows)} examples but {need} were requested ({parts}); lower "
                            f"the sample counts so {what} at most {len(rows)} (e.g. --set "
                            f"{ROLE_FIELD.get(reqs[0].role, 'attack.samples')}=...)" + (f"; or {hint}" if hint else ""))
        if mode == "reference":
            for r in reqs:
                out[r.role] = list(rows[: r.n])
            continue
        perm = list(range(len(rows)))
        if mode != "file":
            # seeded by the content, not the path: the same file anywhere gives the same split
            random.Random(f"{seed}|{name}|{content_fingerprint(rows)}").shuffle(perm)
        by_role = {r.role: r for r in reqs}
        cursor = 0
        for role in ("defence", "attack"):
            if role in by_role:
                n = by_role[role].n
                out[role] = [rows[i] for i in perm[cursor : cursor + n]]
                cursor += n
        if "eval" in by_role:
            n = by_role["eval"].n
            out["eval"] = [rows[i] for i in perm[len(perm) - n :]]
    if disjoint:
        check_disjoint(out)
    return out


def selection_of(ref: DatasetRef) -> tuple[str, str]:
    """``(selection, hint)`` of a dataset reference: its loader's ``selection`` parameter
    ("seeded" when the loader has none) and what the loader suggests when it holds too few rows."""
    loader = make_loader(ref)
    hint = getattr(loader, "shortfall_hint", None)
    return getattr(loader.config, "selection", "seeded"), (hint() if callable(hint) else "")


def content_fingerprint(rows: list[Example]) -> str:
    digest = hashlib.sha256()
    for ex in rows:
        digest.update(ex.prompt.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def check_disjoint(parts: dict[str, list[Example]]) -> None:
    roles = [r for r in ROLE_ORDER if r in parts]
    for i, a in enumerate(roles):
        prompts_a = {ex.prompt.strip().lower() for ex in parts[a]}
        for b in roles[i + 1 :]:
            shared = prompts_a & {ex.prompt.strip().lower() for ex in parts[b]}
            if shared:
                sample = next(iter(shared))[:80]
                raise DataError(f"{a} and {b} data share {len(shared)} prompt(s) (e.g. {sample!r}) but the spec says "
                                "disjoint: true; choose different datasets/splits, keep one row per prompt "
                                "(dataset duplicates=first), or set disjoint=false")


def missing(examples: list[Example], needs: tuple[str, ...]) -> dict[str, int]:
    return {field: sum(1 for ex in examples if not getattr(ex, field)) for field in needs}


def summarize(parts: dict[str, list[Example]], requests: list[Request]) -> dict[str, Any]:
    out = {}
    for r in requests:
        rows = parts.get(r.role, [])
        out[r.role] = {"dataset": {"name": r.ref.name, **r.ref.params()}, "n": len(rows)}
        cut = sum(1 for ex in rows if ex.meta.get("truncated"))
        in_dataset = _TRUNCATED.get(ref_key(r.ref), 0)
        if cut or in_dataset:  # rows cut to MAX_TEXT_CHARS before tokenizing (truncate_long)
            out[r.role]["truncated"] = {"rows": cut, "in_dataset": in_dataset, "max_chars": MAX_TEXT_CHARS}
    return out


def requests_for(spec, defence_cls, defence_cfg, attack_cfg) -> list[Request]:
    reqs = []
    if defence_cls.needs_data:
        reqs.append(Request("defence", defence_cfg.dataset, defence_cfg.samples, ("response", "refusal")))
    # an attack's Config may declare the Example fields its rows need (``attack_needs``; default: the
    # harmful answer); a training-free attack (refusal_ablation) reads the prompts only
    reqs.append(Request("attack", attack_cfg.dataset, attack_cfg.samples,
                        tuple(getattr(attack_cfg, "attack_needs", ("response",)))))
    # an extra evaluation may read the eval examples' answers (answer_loss): complete them too
    eval_needs = tuple(dict.fromkeys(f for name in spec.eval.extra for f in METRICS.get(name).needs_eval))
    reqs.append(Request("eval", attack_cfg.eval_dataset, spec.eval.samples, eval_needs))
    return reqs


def first_line_error(path: str, lineno: int, msg: str) -> DataError:
    return DataError(f"{path}: line {lineno}: {msg}")


def maybe(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    value = str(value).strip()
    return value or None
