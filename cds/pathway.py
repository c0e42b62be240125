"""The care pathway: ordered care steps and urgencies, and the combination of fired effects.

This module decides what a set of fired rules means for the patient. It knows nothing about
durable_rules (the engine only says which rules fired) and nothing about files or FHIR.

Combination (vocabulary ``outcomes.status`` and design.md invariants):

* urgency = the highest urgency of any fired red-flag trigger (routine without one);
* care step = the highest care-step proposal (self-care when nothing proposes one); with any red
  flag at least ``medical``; ``surgical-referral`` without a red flag only when conservative care
  is documented as failed (the last-resort gate), otherwise held at ``medical`` with a reason;
* status: an emergency confirm trigger -> complete; else a suspect trigger whose flag has no
  confirm trigger and whose requested items are unknown -> data-required; else a confirm trigger
  -> complete; else data-required when a required screen item is unknown, complete otherwise.

:func:`guard` re-checks invariant 1 on the finished recommendation, whatever the ruleset said.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cds.conditions import UNKNOWN
from cds.errors import EngineError

if TYPE_CHECKING:
    from cds.recommendation import Recommendation
    from cds.rulesets import CompiledRuleset, Rule


_RANKS: dict[Any, int] = {}


@functools.total_ordering
class _Ordered(enum.Enum):
    @property
    def rank(self) -> int:
        return _RANKS[self]

    def __lt__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return _RANKS[self] < _RANKS[other]

    def __str__(self) -> str:
        return str(self.value)


class CareStep(_Ordered):
    """Care-pathway steps, in order: surgery is the last resort."""

    SELF_CARE = "self-care"
    PHYSICAL_THERAPY = "physical-therapy"
    MEDICAL = "medical"
    SURGICAL_REFERRAL = "surgical-referral"


class Urgency(_Ordered):
    ROUTINE = "routine"
    URGENT = "urgent"
    EMERGENCY = "emergency"


class Status(_Ordered):
    COMPLETE = "complete"
    DATA_REQUIRED = "data-required"


for _enum in (CareStep, Urgency, Status):
    _RANKS.update((member, i) for i, member in enumerate(_enum))


#: Recorded values that still leave a requested or screened item unanswered: a test that was not
#: done is not a result (clinical.md §1.7: "exactly 3 criteria -> do HLA-B27").
NOT_DONE = frozenset({UNKNOWN, "not-tested", "not-done"})


def unanswered(values: Mapping[str, Any], item: str) -> bool:
    return values.get(item, UNKNOWN) in NOT_DONE


def findings_of(rule: Rule, values: Mapping[str, Any]) -> list[str]:
    """The facts a rule's condition read that carry information: present findings and known values."""
    out = []
    for f in rule.facts:
        v = values.get(f, UNKNOWN)
        if f == "region" or v == UNKNOWN or v == "absent":
            continue
        out.append(f)
    return out


def combine(ruleset: CompiledRuleset, case_id: str, values: Mapping[str, Any],
            fired: Sequence[Rule], provenance: Mapping[str, Any]) -> Recommendation:
    from cds.recommendation import Advice, Caution, DataItem, Reason, Recommendation, RedFlag, WeakFlag

    by_type: dict[str, list[Rule]] = {}
    for rule in fired:
        by_type.setdefault(rule.effect["type"], []).append(rule)

    # ---- red flags, grouped by category, in rule order
    flags: dict[str, dict[str, Any]] = {}
    for rule in by_type.get("red-flag", ()):
        eff = rule.effect
        cat = ruleset.red_flags[eff["flag"]]
        urgency = Urgency(eff.get("urgency", cat["urgency"]))
        entry = flags.setdefault(eff["flag"], {"urgency": urgency, "target": None, "triggers": [], "kinds": [],
                                               "findings": {}, "requests": [], "care_step": CareStep.MEDICAL,
                                               "sources": {}})
        entry["triggers"].append(rule.id)
        entry["kinds"].append(eff["trigger"])
        target = eff.get("referral_target", cat["referral_target"])
        if entry["target"] is None or urgency > entry["urgency"]:
            entry["target"] = target
        entry["urgency"] = max(entry["urgency"], urgency)
        if "care_step" in eff:
            entry["care_step"] = max(entry["care_step"], CareStep(eff["care_step"]))
        for f in findings_of(rule, values):
            entry["findings"].setdefault(f, None)
        if eff["trigger"] == "suspect":
            entry["requests"].extend(i for i in eff.get("request", ()) if unanswered(values, i))
        for key in (*cat["sources"], *rule.sources):
            entry["sources"].setdefault(key, None)

    red_flags = tuple(
        RedFlag(id=fid, label=ruleset.red_flags[fid]["label"], urgency=e["urgency"], referral_target=e["target"],
                alternative_targets=tuple(ruleset.red_flags[fid].get("alternative_targets", ())),
                action=ruleset.red_flags[fid].get("action", ""), triggers=tuple(e["triggers"]),
                findings=tuple(e["findings"]), sources=tuple(e["sources"]))
        for fid, e in flags.items())

    urgency = max((f.urgency for f in red_flags), default=Urgency.ROUTINE)

    # ---- care step
    proposals = by_type.get("care-step", ())
    step = max((CareStep(r.effect["step"]) for r in proposals), default=CareStep.SELF_CARE)
    held_back = None
    if step is CareStep.SURGICAL_REFERRAL and values.get("conservative_care_failed") != "present":
        # design.md invariant 3: surgery only after documented failure of conservative care
        step, held_back = CareStep.MEDICAL, "surgical referral held back: failure of physical therapy and " \
                                            "medical treatment, each for an adequate duration, is not documented"
    if red_flags:
        step = max(step, CareStep.MEDICAL, *(e["care_step"] for e in flags.values()))
    # every rule proposing the winning step contributes its content and (first) referral target
    winners = [r for r in proposals if CareStep(r.effect["step"]) is step]
    step_rule = winners[0] if winners else None
    step_content = tuple(dict.fromkeys(c for r in winners for c in r.effect.get("content", ())))
    step_referral = next((r.effect["referral_target"] for r in winners if "referral_target" in r.effect), None)

    # ---- status and the items to ask
    data_items: dict[str, DataItem] = {}
    confirm_emergency = any(k == "confirm" and e["urgency"] is Urgency.EMERGENCY
                            for e in flags.values() for k in e["kinds"])
    pending_suspects = [(fid, e) for fid, e in flags.items() if "confirm" not in e["kinds"] and e["requests"]]
    if confirm_emergency:
        status = Status.COMPLETE
    elif pending_suspects:
        status = Status.DATA_REQUIRED
        for fid, e in pending_suspects:
            for item in e["requests"]:
                if item not in data_items:
                    data_items[item] = DataItem(item=item, reason="asked or examined now to confirm or rule out "
                                                                  + ruleset.red_flags[fid]["label"],
                                                rule_id=e["triggers"][0])
    elif red_flags:
        status = Status.COMPLETE
    if not confirm_emergency and (pending_suspects or not red_flags):
        # the required screen, also asked beside a pending suspicion (vignette MS05: the fracture screen
        # is asked together with the aneurysm checks); a confirmed red flag supersedes it
        for rule in by_type.get("screen", ()):
            for item in rule.effect["require"]:
                if item not in data_items and values.get(item, UNKNOWN) in NOT_DONE:
                    data_items[item] = DataItem(item=item, reason=rule.effect["reason"], rule_id=rule.id)
        status = Status.DATA_REQUIRED if data_items else Status.COMPLETE

    if red_flags:
        # Routine advice and cautions must not stand beside an escalation, and care-step proposals
        # below the escalated step (e.g. STarT low -> self-care) are superseded by it.
        for kind in ("advice", "caution"):
            by_type[kind] = [r for r in by_type.get(kind, ()) if r.effect.get("scope", "always") == "always"]
        fired = [r for r in fired if not (
            (r.effect["type"] in ("advice", "caution") and r.effect.get("scope", "always") != "always")
            or (r.effect["type"] == "care-step" and CareStep(r.effect["step"]) < step))]
    extra = () if not held_back else (Reason(rule_id="cds.surgery_last_resort", title="Surgery is the last resort",
                                             effect="care-step", message=held_back, sources=(), facts_used=()),)
    advice: dict[str, Advice] = {}
    for r in by_type.get("advice", ()):
        if r.effect["text"] not in advice:
            advice[r.effect["text"]] = Advice(text=r.effect["text"], code=r.effect.get("code"), rule_id=r.id,
                                              sources=r.sources)
    cautions = tuple(Caution(rule_id=r.id, message=r.effect["message"], do_not=tuple(r.effect.get("do_not", ())),
                             sources=r.sources) for r in by_type.get("caution", ()))
    weak = tuple(WeakFlag(id=r.id, pathology=r.effect.get("pathology"), message=r.effect["message"],
                          findings=tuple(findings_of(r, values)), sources=r.sources)
                 for r in by_type.get("weak-flag", ()))
    if red_flags:
        top = max(red_flags, key=lambda f: f.urgency)  # first of the highest urgency, in rule order
        referral: str | None = top.referral_target
    else:
        referral = step_referral
    rec = Recommendation(
        case_id=case_id, care_step=step, urgency=urgency, status=status, referral_target=referral,
        red_flags=red_flags, weak_flags=weak, data_required=tuple(data_items.values()),
        advice=tuple(advice.values()), cautions=cautions,
        care_step_detail=(step_rule.effect.get("message") if step_rule else None),
        care_step_content=step_content,
        provenance=dict(provenance), reason_rules=tuple(fired), reason_values=values, extra_reasons=extra,
    )
    guard(rec)
    return rec


def guard(rec: Recommendation) -> None:
    """Invariant 1, checked at run time: a red flag can never end below its own urgency."""
    for flag in rec.red_flags:
        if rec.urgency < flag.urgency or rec.care_step < CareStep.MEDICAL or rec.status is None:
            raise EngineError(f"case {rec.case_id!r}: safety guard: red flag {flag.id} would end below its "
                              "urgency or below the medical step; refusing to return this recommendation")
