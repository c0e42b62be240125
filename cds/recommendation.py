"""The Recommendation: what cds tells a clinician, with the basis for checking it.

Frozen attrs values. :meth:`Recommendation.to_dict` follows schemas/recommendation.schema.json;
:meth:`Recommendation.to_json` is key-sorted and byte-stable, so the same facts and the same
ruleset version always give the same bytes (no clocks, no random ids).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from cds.conditions import UNKNOWN
from cds.pathway import CareStep, Status, Urgency

if TYPE_CHECKING:
    from cds.rulesets import Rule


def _json_value(v: Any) -> Any:
    return v.to_json() if hasattr(v, "to_json") else v


@attrs.frozen
class RedFlag:
    id: str
    label: str
    urgency: Urgency
    referral_target: str
    alternative_targets: tuple[str, ...]
    action: str
    triggers: tuple[str, ...]
    findings: tuple[str, ...]
    sources: tuple[str, ...]


@attrs.frozen
class WeakFlag:
    id: str
    pathology: str | None
    message: str
    findings: tuple[str, ...]
    sources: tuple[str, ...]


@attrs.frozen
class DataItem:
    item: str
    reason: str
    rule_id: str


@attrs.frozen
class Reason:
    rule_id: str
    title: str
    effect: str
    message: str
    sources: tuple[tuple[str, str], ...]  # (key, citation)
    facts_used: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, rule: Rule, values: Mapping[str, Any]) -> Reason:
        get = values.get
        return cls(rule_id=rule.id, title=rule.title, effect=rule.effect["type"], message=rule.message,
                   sources=rule.citations, facts_used=tuple([(f, get(f, UNKNOWN)) for f in rule.facts]))


@attrs.frozen
class Advice:
    text: str
    code: str | None
    rule_id: str
    sources: tuple[str, ...]


@attrs.frozen
class Caution:
    rule_id: str
    message: str
    do_not: tuple[str, ...]
    sources: tuple[str, ...]


@attrs.frozen
class Recommendation:
    case_id: str
    care_step: CareStep
    urgency: Urgency
    status: Status
    referral_target: str | None
    red_flags: tuple[RedFlag, ...]
    weak_flags: tuple[WeakFlag, ...]
    data_required: tuple[DataItem, ...]
    advice: tuple[Advice, ...]
    cautions: tuple[Caution, ...]
    care_step_detail: str | None
    care_step_content: tuple[str, ...]
    provenance: Mapping[str, Any]
    # The reasons are built when first read (serialising them is most of a recommendation's cost and a
    # batch or service may not need them all): the fired rules and the values they read.
    reason_rules: tuple[Any, ...] = attrs.field(default=(), eq=False, repr=False)
    reason_values: Mapping[str, Any] = attrs.field(factory=dict, eq=False, repr=False)
    extra_reasons: tuple[Reason, ...] = ()

    @functools.cached_property
    def reasons(self) -> tuple[Reason, ...]:
        """Every rule that fired (in ruleset order): its message, citations and the facts it read."""
        return tuple(Reason.of(r, self.reason_values) for r in self.reason_rules) + self.extra_reasons

    @property
    def escalated(self) -> bool:
        return bool(self.red_flags)

    def to_dict(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "status": self.status.value,
            "care_step": self.care_step.value,
            "care_step_detail": self.care_step_detail,
            "care_step_content": list(self.care_step_content),
            "urgency": self.urgency.value,
            "referral_target": self.referral_target,
            "escalation": None if not self.red_flags else {
                "urgency": self.urgency.value,
                "referral_target": self.referral_target,
                "red_flags": [f.id for f in self.red_flags],
            },
            "red_flags": [{
                "id": f.id, "label": f.label, "urgency": f.urgency.value, "referral_target": f.referral_target,
                "alternative_targets": list(f.alternative_targets), "action": f.action, "triggers": list(f.triggers),
                "findings": list(f.findings), "sources": list(f.sources)} for f in self.red_flags],
            "weak_flags": [{"id": w.id, "pathology": w.pathology, "message": w.message, "findings": list(w.findings),
                            "sources": list(w.sources)} for w in self.weak_flags],
            "data_required": [{"item": d.item, "reason": d.reason, "rule_id": d.rule_id} for d in self.data_required],
            "reasons": [{"rule_id": r.rule_id, "title": r.title, "effect": r.effect, "message": r.message,
                         "sources": [{"key": k, "citation": c} for k, c in r.sources],
                         "facts_used": {f: _json_value(v) for f, v in r.facts_used}} for r in self.reasons],
            "advice": [{"text": a.text, "code": a.code, "rule_id": a.rule_id, "sources": list(a.sources)}
                       for a in self.advice],
            "cautions": [{"rule_id": c.rule_id, "message": c.message, "do_not": list(c.do_not),
                          "sources": list(c.sources)} for c in self.cautions],
            "provenance": dict(self.provenance),
        }

    def to_json(self, *, indent: int | None = None) -> str:
        """Key-sorted JSON; byte-identical for the same facts and ruleset version."""
        seps = (",", ":") if indent is None else (",", ": ")
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False, indent=indent, separators=seps)
