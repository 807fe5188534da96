"""Error types. Every message names the offending field or value and what is allowed."""

from __future__ import annotations

import difflib


class HarnessError(Exception):
    """Base class for errors the harness reports to the user without a traceback."""


class ConfigError(HarnessError, ValueError):
    """Bad input caught at the edge, before any model is loaded."""


class UnknownComponentError(ConfigError, KeyError):
    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, known
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        super().__init__(f"unknown {kind} {name!r}.{hint} Known {kind}s: {', '.join(known) or '(none)'}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class DataError(ConfigError):
    """A dataset is missing, empty, malformed or too small for the request."""


class EvaluationSkipped(DataError):
    """An extra evaluation has no data source on this machine (no installed package ships it and
    the hub is unreachable): the run leaves it out with a WARNING and a note in the record."""


class ModelUnavailableError(ConfigError):
    """A model id that cannot be loaded (e.g. the hub is unreachable)."""


class DivergedError(HarnessError):
    """Training produced a NaN or infinite loss."""

    def __init__(self, stage: str, step: int, loss: float):
        self.stage, self.step, self.loss = stage, step, loss
        super().__init__(f"{stage} diverged at step {step}: loss = {loss}")


class SecretMissingError(ConfigError):
    """An API key that the chosen scorer needs is not set."""
