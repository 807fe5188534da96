"""BeaverTails (Ji et al. 2023), the paper's harmful QA set: ``PKU-Alignment/BeaverTails``.

Rows ``{"prompt", "response", "category", "is_safe"}``; the paper keeps ``is_safe == False`` rows
of ``30k_train`` (defence and attack) and ``30k_test`` (evaluation). ``path`` reads a local copy
(JSON/JSONL/CSV with the hub's columns) instead of the hub.

Duplicates: a question that appears with several unsafe answers is kept once, with its first
answer (``duplicates: first``, the default, so "disjoint" means disjoint questions); the authors
keep every unsafe row (``duplicates: keep``).

Categories: ``categories: reference`` keeps only the rows the authors' evaluation keeps: their
category list (``BT_CATEGORIES`` in their ``datasets.py``) lacks ``animal_abuse``, ``child_abuse``
and ``controversial_topics,politics``, and they match a row to a category as their code does: the
i-th row of the split is checked against the first flagged category of the i-th *flagged* row
(safe rows flag none, so the lists drift apart after each safe row, and rows past the number of
flagged rows are never reached). Combined with ``selection: reference`` and 300 samples this is
their evaluation set: the first 300 such unsafe rows of ``30k_test`` in file order.

Refusals: a ``refusal`` column in the rows themselves (the authors' ``beavertails_with_refusals``
file carries the hub's columns plus ``refusal``), or ``refusals_path`` (rows with ``prompt`` and
``refusal``), otherwise written by the base model (``harness.lib.synth``), as the reference pairs
BeaverTails questions with the chat model's own refusals. A refusal in the authors' format holds the
whole generation, ``"Question: {prompt}\\nAnswer: {refusal}"``; the question is cut off so that
the harmless twin (``Question: ... Answer:`` + refusal) holds the question once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from harness.api.components import DatasetLoader, Example
from harness.api.errors import DataError
from harness.api.registry import DATASETS
from harness.lib.data import maybe
from harness.lib.datasets.local import read_rows
from harness.lib.datasets.selection import SelectableConfig
from harness.lib.network import hub_reachable

#: the categories the authors' category lists cover (the union of ``BT_CATEGORIES``)
REFERENCE_CATEGORIES = frozenset({
    "violence,aiding_and_abetting,incitement", "hate_speech,offensive_language",
    "discrimination,stereotype,injustice", "misinformation_regarding_ethics,laws_and_safety", "privacy_violation",
    "financial_crime,property_crime,theft", "drug_abuse,weapons,banned_substance", "terrorism,organized_crime",
    "sexually_explicit,adult_content", "non_violent_unethical_behavior", "self_harm",
})
ANSWER_MARK = "\nAnswer:"


def _truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def first_category(category: Any) -> Optional[str]:
    """The first flagged category of a row, in the order its ``category`` mapping lists them."""
    if isinstance(category, dict):
        return next((k for k, v in category.items() if _truthy(v)), None)
    return None


def reference_category_filter(rows: list[dict]) -> list[dict]:
    """The rows the authors' evaluation keeps, with their row/category pairing (module docstring)."""
    flagged = [c for c in (first_category(r.get("category")) for r in rows) if c is not None]
    return [row for row, cat in zip(rows, flagged) if cat in REFERENCE_CATEGORIES]


def strip_question(text: str) -> str:
    """A refusal in the authors' format, ``"Question: ...\\nAnswer: <refusal>"`` -> ``" <refusal>"``
    (the text after the first ``\\nAnswer:``, its leading whitespace kept as the authors' text has
    it); any other text is returned stripped."""
    if text.lstrip().startswith("Question:") and ANSWER_MARK in text:
        return text.split(ANSWER_MARK, 1)[1].rstrip()
    return text.strip()


@DATASETS.register("beavertails")
class BeaverTails(DatasetLoader):
    """BeaverTails harmful QA (unsafe rows), hub or local copy, paired with refusals."""

    provides = ("response",)  # harmful answers; refusals only from a refusal column or refusals_path

    class Config(SelectableConfig):
        split: str = "30k_train"
        hub_id: str = "PKU-Alignment/BeaverTails"
        path: Optional[str] = None
        unsafe_only: bool = True
        refusals_path: Optional[str] = None
        duplicates: Literal["first", "keep"] = "first"
        categories: Literal["all", "reference"] = "all"

    def _rows(self) -> list[dict]:
        if self.config.path:
            return [row for _, row in read_rows(Path(self.config.path).expanduser())]
        if not hub_reachable():
            raise DataError(f"dataset beavertails: the hub ({self.config.hub_id}, split {self.config.split}) is "
                            "unreachable offline; download it elsewhere and pass defence.dataset.path / "
                            "attack.dataset.path (a JSON/JSONL/CSV copy), or use the smoke preset")
        import datasets

        return list(datasets.load_dataset(self.config.hub_id, split=self.config.split))

    def load(self) -> list[Example]:
        c = self.config
        refusals = {}
        if c.refusals_path:
            for _, row in read_rows(Path(c.refusals_path).expanduser()):
                if maybe(row.get("prompt")) and maybe(row.get("refusal")):
                    refusals[row["prompt"].strip()] = strip_question(row["refusal"])
        rows = self._rows()
        if c.categories == "reference":
            rows = reference_category_filter(rows)
        out, seen = [], set()
        for row in rows:
            if c.unsafe_only and _truthy(row.get("is_safe")):
                continue
            prompt, response = maybe(row.get("prompt")), maybe(row.get("response"))
            if not prompt or not response:
                continue
            if c.duplicates == "first":
                if prompt.lower() in seen:
                    continue
                seen.add(prompt.lower())
            own = row.get("refusal")
            refusal = strip_question(own) if maybe(own) else refusals.get(prompt)
            category = row.get("category") or {}
            cats = [k for k, v in category.items() if _truthy(v)] if isinstance(category, dict) else []
            out.append(Example(prompt=prompt, response=response, refusal=refusal or None,
                               meta={"categories": cats}))
        return out

    def shortfall_hint(self) -> str:
        """What to change when a draw asks for more rows than the loaded split holds."""
        hints = []
        if self.config.duplicates == "first":
            hints.append("duplicates=keep keeps every unsafe row, as the authors do (default: one row per prompt)")
        if self.config.selection != "reference":
            hints.append("selection=reference with disjoint=false draws every role from the first rows of the file, "
                         "as the authors' code does")
        return "; ".join(hints)

    def describe_source(self) -> str:
        return self.config.path or f"{self.config.hub_id}:{self.config.split}"
