"""BeaverTails (Ji et al. 2023), the paper's harmful QA set: ``PKU-Alignment/BeaverTails``.

Rows ``{"prompt", "response", "category", "is_safe"}``; the paper keeps ``is_safe == False`` rows
of ``30k_train`` (defence and attack, disjoint) and ``30k_test`` (evaluation). A question that
appears with several unsafe answers is kept once (its first answer), so "disjoint" means
disjoint questions. Refusals: from ``refusals_path`` (JSON/JSONL rows with ``prompt`` and
``refusal``) when given, otherwise written by the base model (``harness.lib.synth``), as the
reference pairs BeaverTails questions with the chat model's own refusals. ``path`` reads a local
copy (JSON/JSONL/CSV with the hub's columns) instead of the hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from harness.api.components import ComponentConfig, DatasetLoader, Example
from harness.lib.data import maybe
from harness.lib.datasets.local import read_rows
from harness.api.errors import DataError
from harness.api.registry import DATASETS


def _truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


@DATASETS.register("beavertails")
class BeaverTails(DatasetLoader):
    """BeaverTails harmful QA (unsafe rows), hub or local copy, paired with refusals."""

    class Config(ComponentConfig):
        split: str = "30k_train"
        hub_id: str = "PKU-Alignment/BeaverTails"
        path: Optional[str] = None
        unsafe_only: bool = True
        refusals_path: Optional[str] = None

    def _rows(self) -> list[dict]:
        if self.config.path:
            return [row for _, row in read_rows(Path(self.config.path).expanduser())]
        from harness.lib.models import hub_reachable

        if not hub_reachable():
            raise DataError(f"dataset beavertails: the hub ({self.config.hub_id}, split {self.config.split}) is "
                            "unreachable offline; download it elsewhere and pass defence.dataset.path / "
                            "attack.dataset.path (a JSON/JSONL/CSV copy), or use the smoke preset")
        import datasets

        return list(datasets.load_dataset(self.config.hub_id, split=self.config.split))

    def load(self) -> list[Example]:
        refusals = {}
        if self.config.refusals_path:
            for _, row in read_rows(Path(self.config.refusals_path).expanduser()):
                if maybe(row.get("prompt")) and maybe(row.get("refusal")):
                    refusals[row["prompt"].strip()] = row["refusal"].strip()
        out, seen = [], set()
        for row in self._rows():
            if self.config.unsafe_only and _truthy(row.get("is_safe")):
                continue
            prompt, response = maybe(row.get("prompt")), maybe(row.get("response"))
            if not prompt or not response or prompt.lower() in seen:
                continue
            seen.add(prompt.lower())
            category = row.get("category") or {}
            cats = [k for k, v in category.items() if _truthy(v)] if isinstance(category, dict) else []
            out.append(Example(prompt=prompt, response=response, refusal=refusals.get(prompt),
                               meta={"categories": cats}))
        return out

    def describe_source(self) -> str:
        return self.config.path or f"{self.config.hub_id}:{self.config.split}"
