"""Benign data-to-text tasks for the trainability criterion: GEM ViGGO, E2E NLG, DART, CACAPO.

Each loader returns ``Example(prompt=<linearised input>, response=<one reference text>,
meta={"references": [all references of that input], "id": ...})``, one per row. Sources:

- ViGGO (Juraska et al. 2019; video-game dialogue acts): hub ``GEM/viggo``, fields
  ``meaning_representation`` -> ``target`` (+ ``references``); or a local folder with
  ``{train,valid,test}.csv`` holding ``mr,ref`` (the original release, and ``../shared/data/viggo``).
- E2E NLG (Novikova et al. 2017; restaurant slots): hub ``GEM/e2e_nlg``, same fields as ViGGO;
  locally the original ``mr,ref`` CSVs.
- DART (Nan et al. 2021; open-domain RDF triples): hub ``GEM/dart``, ``tripleset`` (a list of
  ``[subject, predicate, object]``) -> ``target``; locally the original JSON, whose rows hold
  ``tripleset`` and ``annotations: [{"text": ...}]``.
- CACAPO (van der Lee et al. 2020; sports, weather, stocks, incidents in English and Dutch): hub
  ``GEM/cacapo``, triples (``triplets`` / ``input``, strings ``"attribute | value"`` or
  subject/property/object records) -> ``target``; ``lang`` keeps one language when a language
  column exists.

Triples are linearised as ``"s | p | o ; s | p | o"``. ``path`` (a folder with
``{split}.csv|jsonl|json``) always wins over the hub; a hub that cannot be reached fails at once
with a ``DataError`` naming ``path``. GEM repositories that still hold a loading script (which
``datasets`` 4+ no longer runs) are retried from their ``refs/convert/parquet`` revision and the
fallback is recorded in ``describe_source()``.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar, Optional

from pydantic import Field

from harness.lib.network import host_reachable, hub_endpoint, truthy_env
from harness.api import safeio
from harness.api.components import ComponentConfig, DatasetLoader, Example
from harness.api.errors import DataError
from harness.api.registry import DATASETS
from harness.lib.datasets.local import read_rows

log = logging.getLogger(__name__)

SPLIT_ALIASES = {"validation": ("validation", "valid", "dev", "val"), "valid": ("valid", "validation", "dev", "val"),
                 "dev": ("dev", "validation", "valid", "val"), "test": ("test",), "train": ("train", "training")}
TRIPLE_KEYS = (("subject", "subj", "s"), ("property", "predicate", "relation", "p"), ("object", "obj", "o"))


def linearize_triples(value: Any) -> str:
    """Triples in any of the shapes the hub and the original releases use -> ``"s | p | o ; ..."``."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, dict):
        # a datasets Sequence of records arrives as a dict of columns
        cols = [next((value[k] for k in keys if k in value), None) for keys in TRIPLE_KEYS]
        cols = [c for c in cols if c is not None]
        if cols and all(isinstance(c, list) for c in cols):
            return " ; ".join(" | ".join(str(x).strip() for x in row) for row in zip(*cols))
        return " | ".join(str(v).strip() for v in value.values())
    if isinstance(value, (list, tuple)):
        parts = []
        for item in value:
            if isinstance(item, str):
                parts.append(item.strip())
            elif isinstance(item, (list, tuple)):
                parts.append(" | ".join(str(x).strip() for x in item))
            elif isinstance(item, dict):
                vals = [next((item[k] for k in keys if k in item), None) for keys in TRIPLE_KEYS]
                vals = [v for v in vals if v is not None] or list(item.values())
                parts.append(" | ".join(str(v).strip() for v in vals))
            else:
                parts.append(str(item))
        return " ; ".join(p for p in parts if p)
    return str(value).strip()


def _first(row: dict, names: tuple[str, ...]) -> Any:
    for name in names:
        if name in row and row[name] not in (None, ""):
            return row[name]
    return None


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):  # a list stored as JSON text in a CSV cell
            try:
                parsed = json.loads(text)
                if isinstance(parsed, list):
                    return [str(x) for x in parsed if str(x).strip()]
            except ValueError:
                pass
        return [text] if text else []
    return [str(x) for x in value if x is not None and str(x).strip()]


def _read_file(path: Path) -> list[dict]:
    """The rows of a local CSV/JSONL/JSON file, read with the checked reader of the ``local`` dataset
    (``harness.lib.datasets.local.read_rows``: folders, FIFOs, binary, oversized or malformed files
    fail with one line naming the file and line)."""
    return [row for _, row in read_rows(path)]


def group_by_input(examples: list[Example]) -> list[Example]:
    """Merge rows that share an input (ViGGO and E2E repeat an MR once per reference)."""
    merged: "OrderedDict[str, list[str]]" = OrderedDict()
    for ex in examples:
        refs = merged.setdefault(ex.prompt, [])
        for ref in ex.meta.get("references") or [ex.response]:
            if ref and ref not in refs:
                refs.append(ref)
    return [Example(prompt=mr, response=refs[0], meta={"references": refs}) for mr, refs in merged.items()]








class Data2Text(DatasetLoader):
    """Base of the data-to-text loaders: a local folder or a hub dataset, mapped to Examples."""

    provides = ("response",)  # the reference text

    HUB_ID: ClassVar[str] = ""
    INPUT_FIELDS: ClassVar[tuple[str, ...]] = ("meaning_representation", "mr")
    TARGET_FIELDS: ClassVar[tuple[str, ...]] = ("target", "ref", "reference", "text", "output")
    REFERENCE_FIELDS: ClassVar[tuple[str, ...]] = ("references",)

    class Config(ComponentConfig):
        path: Optional[str] = Field(None, description="local folder with {split}.csv|jsonl|json (wins over the hub)")
        hub_id: Optional[str] = Field(None, description="hub dataset id (default: the GEM one)")
        hub_config: Optional[str] = None
        revision: Optional[str] = None
        split: str = "train"
        lang: Optional[str] = Field(None, description="keep rows of this language (CACAPO: en or nl)")

    def __init__(self, config: ComponentConfig | None = None):
        super().__init__(config)
        self._source = ""

    # -- mapping ---------------------------------------------------------------------------------
    def input_text(self, row: dict) -> str:
        return linearize_triples(_first(row, self.INPUT_FIELDS))

    def references(self, row: dict) -> list[str]:
        refs = []
        for name in self.REFERENCE_FIELDS:
            refs.extend(_as_list(row.get(name)))
        target = _first(row, self.TARGET_FIELDS)
        if target is not None and not isinstance(target, (list, dict)):
            refs.insert(0, str(target).strip())
        seen: list[str] = []
        for r in refs:
            if r and r not in seen:
                seen.append(r)
        return seen

    def to_example(self, row: dict, index: int) -> Optional[Example]:
        mr = self.input_text(row)
        refs = self.references(row)
        if not mr or not refs:
            return None
        return Example(prompt=mr, response=refs[0],
                       meta={"references": refs, "id": row.get("gem_id", index)})

    # -- sources ---------------------------------------------------------------------------------
    def _local_rows(self, folder: Path) -> list[dict]:
        split = self.config.split
        if folder.is_file():
            return _read_file(folder)
        for name in SPLIT_ALIASES.get(split, (split,)):
            for ext in (".csv", ".jsonl", ".json"):
                path = folder / f"{name}{ext}"
                if path.is_file():
                    self._source = f"local file {path}"
                    return _read_file(path)
        raise DataError(f"dataset {self.registry_name}: no {split!r} split in {str(folder)!r} (looked for "
                        f"{'/'.join(SPLIT_ALIASES.get(split, (split,)))}.csv|jsonl|json)")

    def _hub_rows(self) -> list[dict]:
        hub_id = self.config.hub_id or self.HUB_ID
        offline = truthy_env("HF_DATASETS_OFFLINE") or truthy_env("HF_HUB_OFFLINE")
        if not offline and not host_reachable(hub_endpoint()):
            raise DataError(f"dataset {self.registry_name}: the hub ({hub_endpoint()}) is unreachable, so "
                            f"{hub_id!r} cannot be loaded; set path=FOLDER holding {self.config.split}.csv "
                            f"(or .jsonl/.json) with the fields of {hub_id}")
        import datasets

        kwargs = dict(name=self.config.hub_config, split=self.config.split, revision=self.config.revision)
        try:
            ds = datasets.load_dataset(hub_id, **kwargs)
            self._source = f"hub {hub_id}" + (f"@{self.config.revision}" if self.config.revision else "")
        except Exception as exc:  # scripts are gone from datasets 4+: try the parquet conversion
            if "script" not in str(exc).lower() or self.config.revision:
                raise DataError(f"dataset {self.registry_name}: cannot load {hub_id!r} split "
                                f"{self.config.split!r}: {type(exc).__name__}: {exc}") from None
            kwargs["revision"] = "refs/convert/parquet"
            ds = datasets.load_dataset(hub_id, **kwargs)
            self._source = f"hub {hub_id}@refs/convert/parquet (the repository's loading script is not supported)"
        return [dict(r) for r in ds]

    def load(self) -> list[Example]:
        if self.config.path:
            folder = safeio.check_path(Path(self.config.path).expanduser(), f"dataset {self.registry_name}: path",
                                       DataError)
            if not folder.exists():
                raise DataError(f"dataset {self.registry_name}: path {self.config.path!r} does not exist")
            rows = self._local_rows(folder)
            self._source = self._source or f"local {folder}"
        else:
            rows = self._hub_rows()
        if self.config.lang:
            rows = [r for r in rows if str(_first(r, ("lang", "language")) or self.config.lang) == self.config.lang]
        out = [ex for i, row in enumerate(rows) if (ex := self.to_example(row, i)) is not None]
        if not out:
            raise DataError(f"dataset {self.registry_name}: {self.describe_source()} split "
                            f"{self.config.split!r} holds no usable rows (input fields {self.INPUT_FIELDS}, "
                            f"target fields {self.TARGET_FIELDS})")
        return out

    def describe_source(self) -> str:
        return self._source or (f"local {self.config.path}" if self.config.path
                                else f"hub {self.config.hub_id or self.HUB_ID}")


@DATASETS.register("viggo")
class ViGGO(Data2Text):
    """GEM ViGGO: video-game meaning representations -> descriptions (trainability task)."""

    HUB_ID = "GEM/viggo"


@DATASETS.register("e2e_nlg")
class E2ENLG(Data2Text):
    """GEM E2E NLG: restaurant slot-value meaning representations -> descriptions (trainability task)."""

    HUB_ID = "GEM/e2e_nlg"


@DATASETS.register("dart")
class DART(Data2Text):
    """GEM DART: open-domain RDF triple sets -> descriptions (trainability task)."""

    HUB_ID = "GEM/dart"
    INPUT_FIELDS = ("tripleset", "triples", "input", "mr")

    def references(self, row: dict) -> list[str]:
        refs = super().references(row)
        for ann in row.get("annotations") or []:  # the original DART JSON release
            text = ann.get("text") if isinstance(ann, dict) else None
            if text and text.strip() not in refs:
                refs.append(text.strip())
        return refs


@DATASETS.register("cacapo")
class CACAPO(Data2Text):
    """GEM CACAPO: English/Dutch news data (attribute-value triples) -> sentences (trainability task)."""

    HUB_ID = "GEM/cacapo"
    INPUT_FIELDS = ("triplets", "input", "modified_triple_sets", "tripleset", "mr")
    TARGET_FIELDS = ("target", "output", "text", "ref")


DATA2TEXT = {"viggo": ViGGO, "e2e_nlg": E2ENLG, "dart": DART, "cacapo": CACAPO}
