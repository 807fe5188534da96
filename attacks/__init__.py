"""Built-in attacks; each module registers one attack."""

from attacks import harmfulqa, toxicity  # noqa: F401
