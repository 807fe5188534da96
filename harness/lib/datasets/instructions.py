"""Benign instruction data: the ``benign`` attack's training set and the harmless prompts of
``refusal_ablation``.

* ``instructions``: an instruction-tuning set from the hub (default ``tatsu-lab/alpaca``, the set
  Qi et al. 2023 fine-tune on; Dolly is ``databricks/databricks-dolly-15k`` with ``fields:
  {instruction: instruction, input: context, output: response}``) or a local JSON/JSONL/CSV copy
  (``path``). The prompt is the instruction, followed by the input on a new line when the row has
  one; the response is the reference output.
* ``lm_eval_cot``: offline benign question/answer pairs from a file the ``lm-eval`` wheel ships
  (``lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json``: the chain-of-thought exemplars of
  the 57 MMLU subjects, 282 questions with worked answers). The file is located with
  ``importlib.util.find_spec`` and read; lm-eval is never imported. Answers come with the rows,
  so nothing is generated.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Optional

from pydantic import Field

from harness.api.components import DatasetLoader, Example
from harness.api.errors import DataError
from harness.api.registry import DATASETS
from harness.lib.data import maybe
from harness.lib.datasets.local import dig, read_rows
from harness.lib.datasets.selection import SelectableConfig
from harness.lib.network import hub_reachable

COT_FILE = ("tasks", "mmlu", "flan_cot_fewshot", "_cot_prompts.json")


def lm_eval_file(*parts: str) -> Path:
    """A data file inside the installed lm-eval package (located, not imported)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset 'lm_eval_cot' needs the lm-eval wheel's data files: pip install 'lm-eval>=0.4.5,<0.5'")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.exists():
        raise DataError(f"dataset 'lm_eval_cot': {path} not found in the installed lm-eval (0.4.x expected)")
    return path


def split_cot_exemplars(text: str) -> list[tuple[str, str]]:
    """``[(question, answer), ...]`` of one subject's few-shot text ("Q: ...\\nA: ..." blocks after
    a header line)."""
    pairs = []
    for block in re.split(r"(?:^|\n\n)Q: ", text):
        if "\nA: " not in block:
            continue  # the header line
        question, answer = block.split("\nA: ", 1)
        question, answer = question.strip(), answer.strip()
        if question and answer:
            pairs.append((question, answer))
    return pairs


@DATASETS.register("lm_eval_cot")
class LmEvalCoT(DatasetLoader):
    """Benign QA pairs offline: MMLU chain-of-thought exemplars shipped in the lm-eval wheel."""

    provides = ("response",)

    class Config(SelectableConfig):
        subjects: Optional[list[str]] = Field(None, description="MMLU subjects to keep (default: all 57)")

    def load(self) -> list[Example]:
        data = json.loads(lm_eval_file(*COT_FILE).read_text(encoding="utf-8"))
        subjects = self.config.subjects or sorted(data)
        unknown = [s for s in subjects if s not in data]
        if unknown:
            raise DataError(f"dataset 'lm_eval_cot': unknown subject(s) {', '.join(unknown)}; known: "
                            f"{', '.join(sorted(data))}")
        rows, seen = [], set()
        for subject in subjects:
            for question, answer in split_cot_exemplars(data[subject]):
                if question.lower() not in seen:
                    seen.add(question.lower())
                    rows.append(Example(prompt=question, response=answer, meta={"source": f"mmlu_cot/{subject}"}))
        return rows

    def describe_source(self) -> str:
        return "lm-eval wheel data (mmlu flan_cot_fewshot exemplars)"


@DATASETS.register("instructions")
class Instructions(DatasetLoader):
    """Benign instruction-tuning pairs (Alpaca by default), hub or a local copy."""

    provides = ("response",)

    class Config(SelectableConfig):
        hub_id: str = "tatsu-lab/alpaca"
        split: str = "train"
        path: Optional[str] = Field(None, description="local JSON/JSONL/CSV copy (wins over the hub)")
        fields: dict[str, str] = Field(default_factory=lambda: {"instruction": "instruction", "input": "input",
                                                                "output": "output"})

    def _rows(self) -> list[dict]:
        if self.config.path:
            return [row for _, row in read_rows(Path(self.config.path).expanduser())]
        if not hub_reachable():
            raise DataError(f"dataset instructions: the hub ({self.config.hub_id}, split {self.config.split}) is "
                            "unreachable offline; pass attack.dataset.path (a JSON/JSONL/CSV copy) or use "
                            "dataset lm_eval_cot (offline, in the lm-eval wheel)")
        import datasets

        return list(datasets.load_dataset(self.config.hub_id, split=self.config.split))

    def load(self) -> list[Example]:
        f = {"instruction": "instruction", "input": "input", "output": "output", **self.config.fields}
        unknown = sorted(set(f) - {"instruction", "input", "output"})
        if unknown:
            raise DataError(f"dataset instructions: fields has unknown key(s) {', '.join(unknown)}; allowed: "
                            "instruction, input, output")
        out, seen = [], set()
        for row in self._rows():
            instruction, extra, output = (maybe(dig(row, f[k])) for k in ("instruction", "input", "output"))
            if not instruction or not output:
                continue
            prompt = f"{instruction}\n{extra}" if extra else instruction
            if prompt.lower() in seen:
                continue
            seen.add(prompt.lower())
            out.append(Example(prompt=prompt, response=output, meta={"source": self.describe_source()}))
        return out

    def describe_source(self) -> str:
        return self.config.path or f"{self.config.hub_id}:{self.config.split}"
