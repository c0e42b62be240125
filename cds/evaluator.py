"""Evaluate one case: facts -> derived facts -> rules fired -> pathway -> Recommendation.

An :class:`Evaluator` holds one compiled ruleset version for reuse (an EHR integration keeps one
per version it serves). By default it runs the durable_rules network *and* the reference
evaluator and raises :class:`EngineError` when they disagree on which rules fired: a wrong
answer must never be returned silently. ``cross_check=False`` runs only the chosen engine.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from cds import __version__
from cds.errors import EngineError
from cds.facts import PatientFacts
from cds.pathway import combine
from cds.recommendation import Recommendation
from cds.rulesets import CompiledRuleset, Registry, load_ruleset
from cds.scores import derive

ENGINES = ("durable-rules", "reference")
log = logging.getLogger("cds")


def _durable_rules_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("durable-rules")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


class Evaluator:
    def __init__(self, ruleset: CompiledRuleset | str = "back-hip-pain", version: str | None = None, *,
                 as_of: dt.date | None = None, engine: str = "durable-rules", cross_check: bool = True,
                 registry: Registry | None = None) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}")
        self.ruleset = ruleset if isinstance(ruleset, CompiledRuleset) else load_ruleset(
            ruleset, version, as_of=as_of, registry=registry)
        self.engine = engine
        self.cross_check = cross_check
        self._network = self.ruleset.network() if engine == "durable-rules" else None
        self._rules = self.ruleset.rules
        self._params = self.ruleset.parameters
        mode = engine if engine == "reference" or not cross_check else "durable-rules+reference"
        self._provenance = {
            "ruleset_id": self.ruleset.id, "ruleset_version": self.ruleset.version,
            "ruleset_sha256": self.ruleset.sha256,
            "ruleset_released": self.ruleset.released, "cds_version": __version__,
            "durable_rules_version": _durable_rules_version(), "engine": mode,
        }

    def fired(self, values: Mapping[str, Any], case_id: str = "?") -> list[str]:
        """The ids of the rules whose conditions are true, in ruleset order."""
        reference = None
        if self._network is None or self.cross_check:
            reference = [r.id for r in self._rules if r.predicate(values) is True]
        if self._network is None:
            assert reference is not None
            return reference
        by_engine = self._network.fired(values)
        ordered = [r.id for r in self._rules if r.id in by_engine]
        if reference is not None and ordered != reference:
            only_engine = sorted(set(ordered) - set(reference))
            only_reference = sorted(set(reference) - set(ordered))
            raise EngineError(f"case {case_id!r}: durable_rules and the reference evaluator disagree "
                              f"(engine only: {only_engine}; reference only: {only_reference}); no result returned")
        return ordered

    def evaluate(self, case: Mapping[str, Any] | PatientFacts) -> Recommendation:
        facts = case if isinstance(case, PatientFacts) else PatientFacts.from_dict(case)
        values = derive(facts, self._params)
        fired = self.fired(values, facts.case_id)
        rules = [self.ruleset.rules_by_id[i] for i in fired]
        provenance = dict(self._provenance, input_sha256=facts.sha256())
        rec = combine(self.ruleset, facts.case_id, values, rules, provenance)
        if log.isEnabledFor(logging.DEBUG):  # the case id is the only case data cds ever logs
            log.debug("case %r: %d rule(s) fired; %s, %s, %s", facts.case_id, len(rules), rec.status.value,
                      rec.urgency.value, rec.care_step.value)
        return rec

    def evaluate_many(self, cases: Iterable[Mapping[str, Any] | PatientFacts]) -> Iterable[Recommendation]:
        for case in cases:
            yield self.evaluate(case)


_evaluators: dict[tuple[Any, ...], Evaluator] = {}


def evaluate(case: Mapping[str, Any] | PatientFacts, ruleset: str = "back-hip-pain", version: str | None = None,
             *, as_of: dt.date | None = None, engine: str = "durable-rules", cross_check: bool = True) -> Recommendation:
    """Evaluate one case against a ruleset version (None = the newest active one)."""
    compiled = load_ruleset(ruleset, version, as_of=as_of)
    key = (compiled.id, compiled.version, engine, cross_check)
    ev = _evaluators.get(key)
    if ev is None:
        ev = _evaluators.setdefault(key, Evaluator(compiled, engine=engine, cross_check=cross_check))
    return ev.evaluate(case)
