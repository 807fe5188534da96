"""Benchmark harness for defences against harmful fine-tuning."""

__version__ = "0.1.0"
