"""What a plug-in imports: the component bases, the registries, the config types and errors.

    from harness.api import Defence, ComponentConfig, DEFENCES

Nothing here imports torch; the engine (``harness.lib``, ``harness.pipeline``, ``harness.sweep``)
builds on this package, never the other way round.
"""

from harness.api.components import (Attack, Component, ComponentConfig, DatasetLoader, DatasetRef, Defence,
                                     Evaluation, Example, TextScorer, TrainConfig)
from harness.api.errors import (ConfigError, DataError, DivergedError, HarnessError, ModelUnavailableError,
                                SecretMissingError, UnknownComponentError)
from harness.api.registry import ATTACKS, DATASETS, DEFENCES, METRICS, REGISTRIES, Registry

__all__ = ["Attack", "Component", "ComponentConfig", "DatasetLoader", "DatasetRef", "Defence", "Evaluation",
           "Example", "TextScorer", "TrainConfig", "ConfigError", "DataError", "DivergedError", "HarnessError",
           "ModelUnavailableError", "SecretMissingError", "UnknownComponentError", "ATTACKS", "DATASETS",
           "DEFENCES", "METRICS", "REGISTRIES", "Registry"]
