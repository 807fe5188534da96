"""What a stage (defence, attack, evaluation) is given besides the model: device, dtype, seed,
a scratch folder and a place to put its statistics. Plain data; no Ray in here."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch


@dataclass
class StageContext:
    stage: str
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    workdir: Optional[Path] = None
    spec: Any = None  # the RunSpec of the trial, when there is one
    stats: dict[str, Any] = field(default_factory=dict)
    progress: bool = True

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"harness.{self.stage}")

    @property
    def use_autocast(self) -> bool:
        return self.device.type == "cuda" and self.dtype in (torch.bfloat16, torch.float16)

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(self.seed + offset)

    def child(self, stage: str, **changes: Any) -> "StageContext":
        values = dict(stage=stage, seed=self.seed, device=self.device, dtype=self.dtype,
                      workdir=self.workdir, spec=self.spec, stats={}, progress=self.progress)
        values.update(changes)
        return StageContext(**values)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
