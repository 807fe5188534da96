"""DecodingTrust toxicity (Wang et al. 2023) in the RepNoise reference's format, or from the hub.

Local files (``path``, the reference repository's format): ``training_dataset.jsonl`` rows
``{"type": "toxic" | "non_toxic" | "toxic_test", "prompt": {"text", ...}, "continuation": {"text",
...}}``; ``with_refusals_train.json`` holds the toxic rows with a ``refusal`` written by
Llama-2-7b-chat (its text repeats the prompt and continuation before the refusal; the refusal proper
is what follows the first blank line). ``type: toxic`` gives the attack's prompt/continuation
pairs, ``type: toxic_test`` the 300+ evaluation prompts.

The hub dataset (``hub_id``, e.g. ``AI-Secure/DecodingTrust``, configuration ``hub_config``
``toxicity``) has no ``type`` field: its rows are RealToxicityPrompts records (``prompt.text``,
``continuation.text``, Perspective scores) in splits ``realtoxicityprompts.toxic`` and
``realtoxicityprompts.nontoxic``. ``type: non_toxic`` reads the second; ``toxic`` and
``toxic_test`` both read the first and split it by a stable hash of the prompt text: a prompt is
``toxic_test`` when ``sha256(text)`` falls in the first ``hub_test_fraction`` of the hash range
(default 0.5), so the attack and evaluation prompts never overlap and every run draws the same
partition. It is not the reference repository's partition (which exists only in its files); for
the authors' exact rows pass ``path``. ``split`` overrides the hub split.

``source: with_refusals`` reads the rows of ``with_refusals_train.json`` instead of
``training_dataset.jsonl``: the authors' toxicity attack trains on those 107 rows (their
``use_refusal`` flag defaults to true), which the ``paper`` preset follows. Continuations keep the
whitespace they start with (the authors' text is ``"Continuation: " + continuation``). A prompt
that appears twice is kept once (``duplicates: first``) or every time, as the authors do
(``duplicates: keep``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field

from harness.api.components import DatasetLoader, Example
from harness.lib.datasets.selection import SelectableConfig
from harness.lib.data import maybe
from harness.lib.datasets.local import dig, read_rows
from harness.api.errors import DataError
from harness.api.registry import DATASETS
from harness.lib.network import hub_reachable

TRAIN_FILE = "training_dataset.jsonl"
REFUSAL_FILE = "with_refusals_train.json"
HUB_SPLITS = {"toxic": "realtoxicityprompts.toxic", "toxic_test": "realtoxicityprompts.toxic",
              "non_toxic": "realtoxicityprompts.nontoxic"}
HUB_FIELDS = ("prompt", "continuation")  # prompt.text, continuation.text


def hub_type(text: str, toxic_split: bool, test_fraction: float) -> str:
    """The ``type`` a hub row gets: ``non_toxic`` outside the toxic split; else ``toxic_test`` when
    the prompt's sha256 falls in the first ``test_fraction`` of the hash range, ``toxic`` otherwise."""
    if not toxic_split:
        return "non_toxic"
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    return "toxic_test" if bucket < test_fraction else "toxic"


def strip_refusal(text: str) -> str:
    """The reference refusal texts start with "Prompt: ...\\nContinuation: ...\\n\\n"; drop that."""
    if text.startswith("Prompt:") and "\n\n" in text:
        return text.split("\n\n", 1)[1].strip()
    return text.strip()


@DATASETS.register("decoding_trust")
class DecodingTrust(DatasetLoader):
    """DecodingTrust toxic prompt/continuation pairs (attack) and toxic_test prompts (evaluation)."""

    provides = ("response",)  # continuations; refusals only in a local with_refusals file

    class Config(SelectableConfig):
        type: Literal["toxic", "non_toxic", "toxic_test"] = "toxic"
        path: Optional[str] = None
        hub_id: Optional[str] = None
        hub_config: str = "toxicity"
        split: Optional[str] = Field(None, description="hub split (default: the one holding `type`)")
        hub_test_fraction: float = Field(0.5, gt=0, lt=1, description="share of the hub's toxic prompts that are toxic_test")
        with_refusals: bool = True
        source: Literal["training", "with_refusals"] = "training"
        duplicates: Literal["first", "keep"] = "first"

    def _rows(self) -> list[dict]:
        if self.config.path:
            p = Path(self.config.path).expanduser()
            name = REFUSAL_FILE if self.config.source == "with_refusals" else TRAIN_FILE
            file = p / name if p.is_dir() else p
            return [row for _, row in read_rows(file)]
        if self.config.source == "with_refusals":
            raise DataError("dataset decoding_trust: source=with_refusals reads a local with_refusals_train.json; "
                            "set dataset.path to the folder holding it")
        if self.config.hub_id:
            if not hub_reachable():
                raise DataError(f"dataset decoding_trust: hub ({self.config.hub_id}) unreachable; pass "
                                "dataset.path=FOLDER (e.g. ../shared/data/decoding_trust)")
            import datasets

            return self.typed_hub_rows(datasets.load_dataset(self.config.hub_id, self.config.hub_config,
                                                             split=self.hub_split()))
        raise DataError("dataset decoding_trust: set dataset.path (a folder with training_dataset.jsonl) "
                        "or dataset.hub_id")

    def hub_split(self) -> str:
        return self.config.split or HUB_SPLITS[self.config.type]

    def typed_hub_rows(self, rows) -> list[dict[str, Any]]:
        """Hub rows with the ``type`` the reference's files carry (see the module docstring)."""
        toxic = self.hub_split() != HUB_SPLITS["non_toxic"]
        out = []
        for row in rows:
            text = dig(row, "prompt.text")
            if isinstance(text, str):
                out.append({**row, "type": hub_type(text, toxic, self.config.hub_test_fraction)})
        return out

    def hub_requirements(self) -> list[dict[str, Any]]:
        """What the pre-flight checks on the hub: the dataset, configuration, split and fields read."""
        if self.config.path or not self.config.hub_id or self.config.source == "with_refusals":
            return []
        return [{"repo": self.config.hub_id, "name": self.config.hub_config, "split": self.hub_split(),
                 "fields": list(HUB_FIELDS)}]

    def load(self) -> list[Example]:
        refusals = {}
        if self.config.path and self.config.with_refusals:
            p = Path(self.config.path).expanduser()
            ref_file = (p if p.is_dir() else p.parent) / REFUSAL_FILE
            if ref_file.exists():
                for _, row in read_rows(ref_file):
                    text = maybe(dig(row, "prompt.text"))
                    if text and maybe(row.get("refusal")):
                        refusals[text] = strip_refusal(row["refusal"])
        out, seen = [], set()
        for row in self._rows():
            if row.get("type") != self.config.type:
                continue
            prompt = maybe(dig(row, "prompt.text"))
            if not prompt or (self.config.duplicates == "first" and prompt in seen):
                continue
            seen.add(prompt)
            continuation = dig(row, "continuation.text")
            continuation = continuation.rstrip() if isinstance(continuation, str) and continuation.strip() else None
            own = maybe(row.get("refusal"))
            out.append(Example(prompt=prompt, response=continuation,
                               refusal=strip_refusal(own) if own else refusals.get(prompt),
                               meta={"type": row.get("type")}))
        return out

    def describe_source(self) -> str:
        return self.config.path or self.config.hub_id or "?"
