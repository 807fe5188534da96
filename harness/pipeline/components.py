"""The instantiated, validated components of one trial (``Components.build(spec)``).

Building them validates every component config (bad input fails here, before any model loads);
``check_ready`` then fails fast on what needs no model (a missing API key, an offline scorer) or
swaps in a scorer's declared fallback, with a note in the record.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from harness.api.config import RunSpec, attack_config, defence_config, scorer_config
from harness.api.errors import EvaluationSkipped, HarnessError
from harness.api.registry import ATTACKS, DEFENCES, METRICS
from harness.api.secrets import redact
from harness.lib import data as datamod

log = logging.getLogger("harness.pipeline")


@dataclass
class Components:
    """The instantiated, validated components of a spec."""

    spec: RunSpec
    defence: Any
    attack: Any
    harm_scorer: Any
    toxicity_scorer: Any
    extras: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    fallback_from: Optional[dict[str, str]] = None

    @classmethod
    def build(cls, spec: RunSpec) -> "Components":
        d_cls, a_cls = DEFENCES.get(spec.defence.name), ATTACKS.get(spec.attack.name)
        h_cls, t_cls = METRICS.get(spec.eval.harm_scorer.name), METRICS.get(spec.eval.toxicity_scorer.name)
        extras = {n: METRICS.get(n)(METRICS.get(n).Config(**spec.eval.params.get(n, {}))) for n in spec.eval.extra}
        return cls(spec, d_cls(defence_config(spec)), a_cls(attack_config(spec)),
                   h_cls(scorer_config(spec.eval.harm_scorer, "eval.harm_scorer")),
                   t_cls(scorer_config(spec.eval.toxicity_scorer, "eval.toxicity_scorer")), extras)

    @property
    def scorer(self):
        """The text scorer that fits the attack's harm domain."""
        return self.toxicity_scorer if self.attack.evaluation == "toxicity" else self.harm_scorer

    def requests(self) -> list[datamod.Request]:
        return datamod.requests_for(self.spec, type(self.defence), self.defence.config, self.attack.config)

    def check_ready(self) -> None:
        """Everything that can fail without a model fails now (missing API key, offline model).

        A scorer that cannot run is swapped for the spec's ``fallback`` scorer when one is named
        (e.g. Detoxify offline -> profanity_check): a WARNING, a note in the record and
        ``fallback_from`` in the scorer's provenance say so. Without a fallback the error stands.
        """
        try:
            self.scorer.check_ready()
        except HarnessError as exc:
            key = "toxicity_scorer" if self.attack.evaluation == "toxicity" else "harm_scorer"
            scorer_spec = getattr(self.spec.eval, key)
            if not scorer_spec.fallback:
                raise
            cls = METRICS.get(scorer_spec.fallback)
            fallback = cls(cls.Config())
            fallback.check_ready()
            reason = redact(str(exc))
            self.fallback_from = {"scorer": scorer_spec.name, "reason": reason}
            setattr(self, key, fallback)
            note = f"eval.{key}: {scorer_spec.name!r} cannot run ({reason}); scored with fallback {scorer_spec.fallback!r}"
            self.notes.append(note)
            log.warning(note)
        for name, extra in list(self.extras.items()):
            check = getattr(extra, "check_ready", None)
            if check:
                try:
                    check()
                except EvaluationSkipped as exc:
                    del self.extras[name]
                    note = f"eval.extra: {name!r} skipped: {exc}"
                    self.notes.append(note)
                    log.warning(note)
