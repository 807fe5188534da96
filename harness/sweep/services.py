"""API scorers in a sweep: one CPU-only Ray actor per scorer and configuration for the whole sweep.

A sweep runs many stages at once; each scoring with its own Perspective client would multiply the
client-side rate limit by the number of stages. Instead the driver starts one ``ScorerService``
actor per API scorer (Perspective, or any metric with ``remote = True``) and configuration, and
while a stage runs, ``scorer_services`` swaps the registry's scorer class for a proxy that sends
every ``score`` call to that actor: one rate limit, one cache, one API client for the cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from harness.api.config import scorer_config
from harness.api.registry import ATTACKS, METRICS
from harness.sweep.grid import import_plugins

def is_api_scorer(name: str) -> bool:
    """A scorer that calls a remote API (the ``remote`` trait of its class, e.g. Perspective)."""
    return bool(getattr(METRICS.get(name), "remote", False))


def scorer_key(name: str, params: dict[str, Any]) -> str:
    blob = json.dumps({"name": name, **params}, sort_keys=True, default=str)
    return f"{name}|{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def cell_scorer(spec) -> tuple[str, dict[str, Any]]:
    """The text scorer a cell uses (as ``Components.scorer`` picks it) and its validated params."""
    key = "toxicity_scorer" if ATTACKS.get(spec.attack.name).evaluation == "toxicity" else "harm_scorer"
    scorer = getattr(spec.eval, key)
    return scorer.name, scorer_config(scorer, f"eval.{key}").model_dump(mode="json")


class ScorerService:
    """An API scorer (Perspective) shared by every stage of a sweep, as a Ray actor without GPU:
    one client-side rate limit for the whole cluster (N concurrent stages must not each send
    ``qps`` requests per second), one on-disk cache, one API client. Stages call it through a
    proxy class that replaces the scorer in the registry while the stage runs."""

    def __init__(self, name: str, params: dict[str, Any], plugins: list[str]):
        import_plugins(plugins)
        cls = METRICS.get(name)
        self.scorer = cls(cls.Config(**params))
        self.ready = False

    def score(self, prompts: list[str], generations: list[str]):
        if not self.ready:
            self.scorer.check_ready()
            self.ready = True
        stats = getattr(self.scorer, "stats", None)
        before = dict(stats) if isinstance(stats, dict) else {}
        scores = self.scorer.score(prompts, generations)
        after = getattr(self.scorer, "stats", None)
        delta = {k: v - before.get(k, 0) for k, v in (after or {}).items() if isinstance(v, (int, float))}
        return scores, delta, os.getpid()


def _proxy_score(self, prompts, generations):
    import ray

    handle = type(self)._harness_services.get(scorer_key(self.registry_name, self.config.model_dump(mode="json")))
    if handle is None:  # a configuration the sweep did not plan for: score here
        return super(type(self), self).score(prompts, generations)
    scores, delta, pid = ray.get(handle.score.remote(list(prompts), list(generations)))
    stats = getattr(self, "stats", None)
    if isinstance(stats, dict):
        for k, v in delta.items():
            stats[k] = stats.get(k, 0) + v
    self.scored_by_pid = pid
    return scores


class scorer_services:
    """While a stage runs, the registry's API scorers score through the sweep's scorer services."""

    def __init__(self, services: dict[str, Any]):
        self.services = services
        self.swapped: dict[str, Any] = {}

    def __enter__(self):
        for name in sorted({k.split("|")[0] for k in self.services}):
            real = METRICS.get(name)
            proxy = type(real.__name__, (real,), {"score": _proxy_score, "_harness_services": self.services,
                                                  "__module__": real.__module__, "__doc__": real.__doc__})
            proxy.registry_name = name
            self.swapped[name] = real
            METRICS._items[name] = proxy  # restored on exit; the registry has no public replace
        return self

    def __exit__(self, *exc):
        for name, real in self.swapped.items():
            METRICS._items[name] = real
        return False
