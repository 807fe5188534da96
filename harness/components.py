"""Deprecated: import from ``harness.api`` (``harness.api.components``). Kept so plug-ins written
for the flat layout keep working; it re-exports the same objects."""

import warnings

from harness.api.components import *  # noqa: F401,F403
from harness.api.components import (Attack, Component, ComponentConfig, DatasetLoader, DatasetRef,  # noqa: F401
                                     Defence, Evaluation, Example, TextScorer, TrainConfig)

warnings.warn("harness.components is deprecated; import from harness.api instead", DeprecationWarning, stacklevel=2)
