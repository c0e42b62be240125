"""Derived facts, computed from the case before any rule runs.

Each derived fact follows its definition in the clinical vocabulary (``derived``) or in
clinical.md; thresholds come from the ruleset's parameters, so a ruleset version fixes them.
Derived facts are three-valued like findings: a derived fact is ``unknown`` whenever the
missing inputs could change it.

STarT Back (clinical.md §3; Keele): items 1-9 score 1 when agreed (item 9: very much or
extremely); total = items 1-9; psychosocial subscore = items 5-9. Stratum: low if total <= 3;
high if subscore >= 4; otherwise medium.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cds.conditions import UNKNOWN, compare
from cds.facts import PatientFacts

DERIVED: dict[str, dict[str, Any]] = {
    "ng65_onset_before_35": {"kind": "tri_state", "values": ("present", "absent", "unknown")},
    "ng65_entry": {"kind": "tri_state", "values": ("present", "absent", "unknown")},
    "no_improvement_after_4_weeks": {"kind": "tri_state", "values": ("present", "absent", "unknown")},
    "duration_category": {"kind": "enum", "values": ("acute", "subacute", "chronic", "unknown")},
    "hip_oa_clinical_diagnosis": {"kind": "tri_state", "values": ("present", "absent", "unknown")},
    "start_back_total": {"kind": "number"},
    "start_back_psychosocial_subscore": {"kind": "number"},
    "start_back_stratum": {"kind": "enum", "values": ("low", "medium", "high", "unknown")},
    "odi_percent": {"kind": "number"},
    "self_care_trial_failed": {"kind": "tri_state", "values": ("present", "absent", "unknown")},
    "physical_therapy_trial_failed": {"kind": "tri_state", "values": ("present", "absent", "unknown")},
    "medical_trial_failed": {"kind": "tri_state", "values": ("present", "absent", "unknown")},
    "nonsurgical_treatment_failed": {"kind": "tri_state", "values": ("present", "absent", "unknown")},
    "conservative_care_failed": {"kind": "tri_state", "values": ("present", "absent", "unknown")},
}

#: Ruleset parameters the derived facts read; a ruleset must declare every one of them.
PARAMETERS = (
    "fever_present_at_or_above_c", "fever_absent_at_or_below_c",
    "ng65_onset_age_under", "ng65_early_onset_age_under", "ng65_duration_weeks_over",
    "no_improvement_trial_weeks", "duration_acute_under_weeks", "duration_chronic_over_weeks",
    "hip_oa_age_at_least", "hip_oa_morning_stiffness_max_minutes",
    "self_care_trial_weeks", "physical_therapy_trial_weeks", "medical_trial_weeks",
)

START_BACK_ITEMS = (
    "q1_leg_pain", "q2_shoulder_neck_pain", "q3_walked_short_distances", "q4_dressed_slowly",
    "q5_not_safe_to_be_active", "q6_worrying_thoughts", "q7_pain_terrible_never_better",
    "q8_not_enjoyed_things", "q9_bothersomeness",
)
PSYCHOSOCIAL = frozenset(START_BACK_ITEMS[4:])
Q9_SCORES = frozenset({"very-much", "extremely"})
NOT_ADEQUATELY_IMPROVED = frozenset({"partial", "no-improvement", "worse"})
FAILURE_TO_IMPROVE = frozenset({"no-improvement", "worse"})
IMPROVED = frozenset({"resolved", "improved"})
NON_SURGICAL = frozenset({"self-care", "physical-therapy", "medical"})
HIP_OA_ATYPICAL = ("major_trauma", "minor_trauma", "hot_swollen_tender_joint", "progressive_or_rapidly_worsening_pain")


def _tri(x: bool | None) -> str:
    return UNKNOWN if x is None else ("present" if x else "absent")


def _and(*parts: bool | None) -> bool | None:
    if any(p is False for p in parts):
        return False
    return None if any(p is None for p in parts) else True


def start_back_stratum(total: int, subscore: int) -> str:
    if total <= 3:
        return "low"
    return "high" if subscore >= 4 else "medium"


def start_back_scores(answers: Mapping[str, Any] | None) -> tuple[Any, Any, str]:
    """(total, psychosocial subscore, stratum); unknown where unanswered items could change it."""
    if answers is None:
        return UNKNOWN, UNKNOWN, UNKNOWN
    total = sub = 0
    open_total = open_sub = 0
    for item in START_BACK_ITEMS:
        a = answers.get(item)
        if a is None:
            open_total += 1
            open_sub += item in PSYCHOSOCIAL
            continue
        score = (a in Q9_SCORES) if item == "q9_bothersomeness" else (a is True)
        total += score
        if item in PSYCHOSOCIAL:
            sub += score
    # The stratum is monotone in every item, so the all-disagree and all-agree completions bound it.
    low, high = start_back_stratum(total, sub), start_back_stratum(total + open_total, sub + open_sub)
    stratum = low if low == high else UNKNOWN
    if open_total:
        return UNKNOWN, UNKNOWN, stratum
    return total, sub, stratum


def _trial_failed(facts: PatientFacts, step: str, min_weeks: float) -> str:
    failed = improved = False
    for t in facts.treatments:
        if t.step != step:
            continue
        if t.outcome in NOT_ADEQUATELY_IMPROVED and not isinstance(t.weeks, str) and t.weeks >= min_weeks:
            failed = True
        elif t.outcome in IMPROVED:
            improved = True
    return "present" if failed else ("absent" if improved else UNKNOWN)


def derive(facts: PatientFacts, params: Mapping[str, float]) -> dict[str, Any]:
    """The flat ``{fact_id: value}`` view the rules read: context, findings, derived facts."""
    values: dict[str, Any] = dict(facts.context)
    values.update(facts.findings)
    get = values.get

    # fever from a measured temperature, when fever itself was not recorded (vocabulary)
    temp = get("temperature_c", UNKNOWN)
    if "fever" not in values and temp != UNKNOWN:
        if compare(temp, "ge", params["fever_present_at_or_above_c"]) is True:
            values["fever"] = "present"
        elif compare(temp, "le", params["fever_absent_at_or_below_c"]) is True:
            values["fever"] = "absent"
    side = get("leg_symptom_laterality", UNKNOWN)
    if "bilateral_leg_symptoms" not in values and side != UNKNOWN:
        values["bilateral_leg_symptoms"] = "present" if side == "bilateral" else "absent"

    age = get("age_years", UNKNOWN)
    duration = get("pain_duration_weeks", UNKNOWN)

    # NG65: the back pain started before an age. When the onset age is not recorded, the current
    # episode's start (age - duration) is an upper bound of it: it can prove "before", never "not before".
    onset_age = get("back_pain_onset_age_years", UNKNOWN)

    def onset_before(limit: float) -> bool | None:
        if onset_age != UNKNOWN:
            return compare(onset_age, "lt", limit)
        if isinstance(age, (int, float)) and isinstance(duration, (int, float)):
            return True if age - duration / 52.0 < limit else None
        return None

    values["ng65_onset_before_35"] = _tri(onset_before(params["ng65_early_onset_age_under"]))
    values["ng65_entry"] = _tri(_and(onset_before(params["ng65_onset_age_under"]),
                                     compare(duration, "gt", params["ng65_duration_weeks_over"])))

    trial = params["no_improvement_trial_weeks"]
    if any(t.outcome in FAILURE_TO_IMPROVE and not isinstance(t.weeks, str) and t.weeks >= trial
           for t in facts.treatments):
        values["no_improvement_after_4_weeks"] = "present"
    elif compare(duration, "lt", trial) is True or any(t.outcome in NOT_ADEQUATELY_IMPROVED - FAILURE_TO_IMPROVE
                                                       or t.outcome in IMPROVED for t in facts.treatments):
        values["no_improvement_after_4_weeks"] = "absent"
    else:
        values["no_improvement_after_4_weeks"] = UNKNOWN

    if compare(duration, "lt", params["duration_acute_under_weeks"]) is True:
        values["duration_category"] = "acute"
    elif compare(duration, "gt", params["duration_chronic_over_weeks"]) is True:
        values["duration_category"] = "chronic"
    elif _and(compare(duration, "ge", params["duration_acute_under_weeks"]),
              compare(duration, "le", params["duration_chronic_over_weeks"])) is True:
        values["duration_category"] = "subacute"
    else:
        values["duration_category"] = UNKNOWN

    stiffness = get("morning_stiffness_minutes", UNKNOWN)
    if any(get(f) == "present" for f in HIP_OA_ATYPICAL):
        values["hip_oa_clinical_diagnosis"] = "absent"  # NG226 1.1.2: atypical features block it
    else:
        activity = get("activity_related_joint_pain", UNKNOWN)
        values["hip_oa_clinical_diagnosis"] = _tri(_and(
            compare(age, "ge", params["hip_oa_age_at_least"]),
            None if activity == UNKNOWN else activity == "present",
            compare(stiffness, "le", params["hip_oa_morning_stiffness_max_minutes"]),
        ))

    total, sub, stratum = start_back_scores(facts.start_back)
    values["start_back_total"] = total
    values["start_back_psychosocial_subscore"] = sub
    values["start_back_stratum"] = stratum

    answered = [v for v in (facts.odi or {}).values() if v is not None]
    values["odi_percent"] = round(sum(answered) * 100.0 / (5 * len(answered)), 1) if answered else UNKNOWN

    sc = _trial_failed(facts, "self-care", params["self_care_trial_weeks"])
    pt = _trial_failed(facts, "physical-therapy", params["physical_therapy_trial_weeks"])
    med = _trial_failed(facts, "medical", params["medical_trial_weeks"])
    values["self_care_trial_failed"] = sc
    values["physical_therapy_trial_failed"] = pt
    values["medical_trial_failed"] = med

    non_surgical = [t for t in facts.treatments if t.step in NON_SURGICAL]
    any_improved = any(t.outcome in IMPROVED for t in non_surgical)
    has_pt = any(t.step == "physical-therapy" for t in non_surgical)
    has_other = any(t.step == "medical" for t in non_surgical)
    if any_improved:
        values["nonsurgical_treatment_failed"] = "absent"
    elif has_pt and has_other and all(t.outcome in NOT_ADEQUATELY_IMPROVED for t in non_surgical):
        values["nonsurgical_treatment_failed"] = "present"
    else:
        values["nonsurgical_treatment_failed"] = UNKNOWN
    if pt == "present" and med == "present" and not any_improved:
        values["conservative_care_failed"] = "present"
    elif any_improved:
        values["conservative_care_failed"] = "absent"
    else:
        values["conservative_care_failed"] = UNKNOWN
    # drop unknowns so that "missing" and "unknown" are one thing downstream
    return {k: v for k, v in values.items() if v != UNKNOWN}
