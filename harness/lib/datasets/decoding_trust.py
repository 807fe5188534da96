"""DecodingTrust toxicity (Wang et al. 2023) in the RepNoise reference's format.

``training_dataset.jsonl`` rows ``{"type": "toxic" | "non_toxic" | "toxic_test", "prompt": {"text",
...}, "continuation": {"text", ...}}``; ``with_refusals_train.json`` holds the toxic rows with a
``refusal`` written by Llama-2-7b-chat (its text repeats the prompt and continuation before the
refusal; the refusal proper is what follows the first blank line). ``type: toxic`` gives the
attack's prompt/continuation pairs, ``type: toxic_test`` the 300+ evaluation prompts.
``path`` is the folder (or a file) holding these files; ``hub_id`` a hub dataset with the same
columns for users who mirror it there.

``source: with_refusals`` reads the rows of ``with_refusals_train.json`` instead of
``training_dataset.jsonl``: the authors' toxicity attack trains on those 107 rows (their
``use_refusal`` flag defaults to true), which the ``paper`` preset follows. Continuations keep the
whitespace they start with (the authors' text is ``"Continuation: " + continuation``). A prompt
that appears twice is kept once (``duplicates: first``) or every time, as the authors do
(``duplicates: keep``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from harness.api.components import DatasetLoader, Example
from harness.lib.datasets.selection import SelectableConfig
from harness.lib.data import maybe
from harness.lib.datasets.local import dig, read_rows
from harness.api.errors import DataError
from harness.api.registry import DATASETS

TRAIN_FILE = "training_dataset.jsonl"
REFUSAL_FILE = "with_refusals_train.json"


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
        split: str = "train"
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
            from harness.lib.models import hub_reachable

            if not hub_reachable():
                raise DataError(f"dataset decoding_trust: hub ({self.config.hub_id}) unreachable; pass "
                                "dataset.path=FOLDER (e.g. ../shared/data/decoding_trust)")
            import datasets

            return list(datasets.load_dataset(self.config.hub_id, split=self.config.split))
        raise DataError("dataset decoding_trust: set dataset.path (a folder with training_dataset.jsonl) "
                        "or dataset.hub_id")

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
