"""Derived facts: STarT Back on all 1,280 answer combinations, NG65, trials, fills from measurements."""

from __future__ import annotations

import itertools

import pytest

import cds
from cds.scores import START_BACK_ITEMS, derive, start_back_scores

Q9 = ["not-at-all", "slightly", "moderately", "very-much", "extremely"]


def keele(q1, q2, q3, q4, q5, q6, q7, q8, q9):
    """The published Keele algorithm, written directly: total of 9 items; psychosocial = Q5-Q9;
    total <= 3 low; else subscore <= 3 medium; else high. Q9 scores for 'very much' and 'extremely'."""
    q9_point = 1 if q9 in ("very-much", "extremely") else 0
    total = sum([q1, q2, q3, q4, q5, q6, q7, q8]) + q9_point
    sub = sum([q5, q6, q7, q8]) + q9_point
    if total <= 3:
        return total, sub, "low"
    return total, sub, ("medium" if sub <= 3 else "high")


@pytest.mark.parametrize("q9", Q9)
def test_start_back_all_1280_combinations(q9):
    for bits in itertools.product([False, True], repeat=8):
        answers = dict(zip(START_BACK_ITEMS, [*bits, q9], strict=True))
        assert start_back_scores(answers) == keele(*bits, q9), answers


def test_start_back_boundaries_from_the_vocabulary():
    def scores(agree: set[int], q9: str = "not-at-all"):
        answers = {item: (i + 1) in agree for i, item in enumerate(START_BACK_ITEMS[:8])}
        answers["q9_bothersomeness"] = q9
        return start_back_scores(answers)

    assert scores({1, 5, 6}) == (3, 2, "low")
    assert scores({5, 6, 7}, "extremely") == (4, 4, "high")
    assert scores({1, 5, 6, 7}) == (4, 3, "medium")
    assert scores({1, 2, 3, 4}, "moderately") == (4, 0, "medium")  # q9 moderately scores 0


def test_partial_start_back_keeps_a_stratum_only_when_it_is_decided():
    answers = dict.fromkeys(START_BACK_ITEMS[:8], False)
    assert start_back_scores(answers) == ("unknown", "unknown", "low")  # q9 missing: total at most 1
    answers = dict.fromkeys(START_BACK_ITEMS[:4], True)
    assert start_back_scores(answers)[2] == "unknown"                    # 4..9: medium or high
    assert start_back_scores(None) == ("unknown", "unknown", "unknown")


PARAMS = cds.load_ruleset("back-hip-pain", "1.0.0").parameters


def values(**kw):
    case = {"case_id": "c", "context": {"region": "back", **kw.pop("context", {})}, **kw}
    return derive(cds.PatientFacts.from_dict(case), PARAMS)


def test_fever_and_bilateral_symptoms_are_filled_only_when_not_recorded():
    assert values(findings={"temperature_c": 38.0})["fever"] == "present"
    assert values(findings={"temperature_c": 37.2})["fever"] == "absent"
    assert "fever" not in values(findings={"temperature_c": 37.6})     # in between: unknown
    assert values(findings={"temperature_c": 39, "fever": "absent"})["fever"] == "absent"  # recorded wins
    assert values(findings={"temperature_c": {"gt": 38.5}})["fever"] == "present"
    assert values(context={"leg_symptom_laterality": "bilateral"})["bilateral_leg_symptoms"] == "present"
    assert values(context={"leg_symptom_laterality": "left"})["bilateral_leg_symptoms"] == "absent"
    assert "bilateral_leg_symptoms" not in values()


def test_ng65_entry_and_onset():
    v = values(context={"back_pain_onset_age_years": 44.9, "pain_duration_weeks": 13.5})
    assert v["ng65_entry"] == "present" and v["ng65_onset_before_35"] == "absent"
    assert values(context={"back_pain_onset_age_years": 45, "pain_duration_weeks": 20})["ng65_entry"] == "absent"
    assert values(context={"back_pain_onset_age_years": 30, "pain_duration_weeks": 13})["ng65_entry"] == "absent"
    # onset age not recorded: age minus duration bounds it from above, so it can prove "before" only
    assert values(context={"age_years": 40, "pain_duration_weeks": 20})["ng65_entry"] == "present"
    assert "ng65_entry" not in values(context={"age_years": 50, "pain_duration_weeks": 20})
    assert "ng65_entry" not in values(context={"back_pain_onset_age_years": 30})


def test_trials_and_the_last_resort_gate():
    tx = [{"step": "physical-therapy", "weeks": 6, "outcome": "partial"},
          {"step": "medical", "weeks": 6, "outcome": "no-improvement"}]
    v = values(treatments=tx)
    assert v["physical_therapy_trial_failed"] == v["medical_trial_failed"] == "present"
    assert v["conservative_care_failed"] == "present" and v["nonsurgical_treatment_failed"] == "present"
    short = [dict(tx[0], weeks=5), tx[1]]
    assert "conservative_care_failed" not in values(treatments=short)
    unknown_weeks = [dict(tx[0], weeks="unknown"), tx[1]]
    assert "conservative_care_failed" not in values(treatments=unknown_weeks)
    improved = [*tx, {"step": "self-care", "weeks": 2, "outcome": "improved"}]
    assert values(treatments=improved)["conservative_care_failed"] == "absent"
    assert values(treatments=[{"step": "self-care", "weeks": 4, "outcome": "worse"}])["self_care_trial_failed"] == "present"


def test_no_improvement_after_4_weeks_and_duration():
    assert values(treatments=[{"step": "self-care", "weeks": 4, "outcome": "no-improvement"}])[
        "no_improvement_after_4_weeks"] == "present"
    assert values(context={"pain_duration_weeks": 3})["no_improvement_after_4_weeks"] == "absent"
    assert "no_improvement_after_4_weeks" not in values(context={"pain_duration_weeks": 6})
    assert [values(context={"pain_duration_weeks": w})["duration_category"] for w in (3.9, 4, 12, 12.1)] == [
        "acute", "subacute", "subacute", "chronic"]


def test_hip_oa_clinical_diagnosis():
    base = {"activity_related_joint_pain": "present", "morning_stiffness_minutes": 30}
    assert values(context={"age_years": 45}, findings=base)["hip_oa_clinical_diagnosis"] == "present"
    assert values(context={"age_years": 44}, findings=base)["hip_oa_clinical_diagnosis"] == "absent"
    assert values(context={"age_years": 60}, findings={**base, "morning_stiffness_minutes": 31})[
        "hip_oa_clinical_diagnosis"] == "absent"
    assert values(context={"age_years": 60}, findings={**base, "minor_trauma": "present"})[
        "hip_oa_clinical_diagnosis"] == "absent"
    assert "hip_oa_clinical_diagnosis" not in values(context={"age_years": 60},
                                                     findings={"activity_related_joint_pain": "present"})


def test_odi_percent():
    odi = {"odi_pain_intensity": 2, "odi_personal_care": 1, "odi_lifting": 3, "odi_walking": 2, "odi_sitting": 2,
           "odi_standing": 2, "odi_sleeping": 1, "odi_sex_life": None, "odi_social_life": 2, "odi_traveling": 1}
    assert values(odi=odi)["odi_percent"] == round(16 / 45 * 100, 1)  # the vocabulary's worked example: 35.6
