"""Deprecated: import from ``harness.api`` (``harness.api.registry``). Kept so plug-ins written
for the flat layout keep working; it re-exports the same registries."""

import warnings

from harness.api.registry import *  # noqa: F401,F403
from harness.api.registry import ATTACKS, DATASETS, DEFENCES, METRICS, REGISTRIES, Registry, describe  # noqa: F401

warnings.warn("harness.registry is deprecated; import from harness.api instead", DeprecationWarning, stacklevel=2)
