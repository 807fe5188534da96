"""Built-in dataset loaders; each module registers one dataset."""

from harness.lib.datasets import beavertails, decoding_trust, local, smoke  # noqa: F401
