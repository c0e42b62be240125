"""Red-flag triggers of the back-hip-pain ruleset: one minimal firing case per trigger, and cases on
either side of every numeric threshold.

Every case starts from a *complete negative screen* (every tri-state finding recorded absent, so
nothing is unknown and no trigger can fire) and adds only the trigger's own findings. Thresholds
are read from the ruleset's parameters, so the boundary cases follow a parameter change.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

import cds
from tests.conftest import ENGINE

RULESET, VERSION = "back-hip-pain", "1.0.0"
ROOT = Path(__file__).resolve().parents[1]
RULES = yaml.safe_load((ROOT / "rulesets" / RULESET / f"{VERSION}.yaml").read_text(encoding="utf-8"))
PARAMS = {k: v["value"] for k, v in RULES["parameters"].items()}
TRIGGERS = {r["id"]: r["effect"] for r in RULES["rules"] if r["effect"]["type"] == "red-flag"}
URGENCY = ["routine", "urgent", "emergency"]
STEPS = ["self-care", "physical-therapy", "medical", "surgical-referral"]

_FINDINGS = json.loads((ROOT / "schemas" / "patient-facts.schema.json").read_text(encoding="utf-8"))[
    "properties"]["findings"]["properties"]
_ENUM_NEGATIVES = {"hla_b27": "negative", "surgery_requested": "none", "hip_xray_result": "not-done",
                   "medial_branch_block_result": "not-done"}


def _negative_screen() -> dict:
    """Every tri-state finding absent, neutral enums, afebrile, STarT Back low risk."""
    findings = {k: "absent" for k, p in _FINDINGS.items() if p.get("x-cds-kind") == "tri_state"}
    findings.update(_ENUM_NEGATIVES)
    findings["temperature_c"] = 36.8
    return {
        "case_id": "negative-screen",
        "context": {"age_years": 40, "sex": "female", "region": "back", "pain_duration_weeks": 2,
                    "onset": "gradual", "leg_symptom_laterality": "none", "back_pain_onset_age_years": 40},
        "findings": findings,
        "treatments": [],
        "start_back": {
            "q1_leg_pain": False, "q2_shoulder_neck_pain": False, "q3_walked_short_distances": False,
            "q4_dressed_slowly": False, "q5_not_safe_to_be_active": False, "q6_worrying_thoughts": False,
            "q7_pain_terrible_never_better": False, "q8_not_enjoyed_things": False,
            "q9_bothersomeness": "not-at-all"},
    }


NEGATIVE_SCREEN = _negative_screen()
CONTEXT_KEYS = set(NEGATIVE_SCREEN["context"])


def case(region: str = "back", remove: tuple[str, ...] = (), **values) -> dict:
    """The negative screen for a region, with some values set (context or findings) or removed."""
    c = copy.deepcopy(NEGATIVE_SCREEN)
    c["context"]["region"] = region
    if region == "hip":
        c.pop("start_back")  # STarT Back is a back-pain tool
    for k in remove:
        c["context"].pop(k, None)
        c["findings"].pop(k, None)
    for k, v in values.items():
        (c["context"] if k in CONTEXT_KEYS else c["findings"])[k] = v
    return c


def evaluate(c: dict) -> dict:
    return cds.evaluate(c, ruleset=RULESET, version=VERSION, engine=ENGINE).to_dict()


def fired_triggers(rec: dict) -> set[str]:
    return {t for f in rec["red_flags"] for t in f["triggers"]}


# ----------------------------------------------------------------------------- sanity of the base
@pytest.mark.parametrize("region", ["back", "hip"])
def test_negative_screen_is_complete_and_clear(region: str) -> None:
    rec = evaluate(case(region))
    assert rec["status"] == "complete", rec["data_required"]
    assert rec["red_flags"] == []
    assert rec["urgency"] == "routine"
    assert rec["care_step"] == "self-care"


# ----------------------------------------------------------------------------- one case per trigger
P = "present"
FIRING_CASES: dict[str, list[dict]] = {
    "ces_core_feature": [case(**{item: P}) for item in RULES["lists"]["ces_core_features"]],
    "ces_bilateral_leg_symptoms": [case(leg_pain=P, bilateral_leg_symptoms=P, leg_symptom_laterality="bilateral")],
    "pnd_progressive_or_major_deficit": [case(**{item: P}) for item in (
        "progressive_leg_weakness", "major_motor_weakness", "multilevel_or_bilateral_motor_deficit",
        "gait_disturbance")],
    "sm_history_of_cancer": [case(history_of_cancer=P)],
    "sm_ng12_age_weight_loss": [case(age_years=PARAMS["ng12_age_at_least"], unexplained_weight_loss=P)],
    "sm_combined_weak_flags": [case(age_years=PARAMS["malignancy_age_over"] + 1, unexplained_weight_loss=P,
                                    night_pain=P)],
    "mscc_cancer_with_neurology": [case(history_of_cancer=P, **{item: P})
                                   for item in RULES["lists"]["mscc_neurological_features"]],
    "si_systemic_features_with_risk_factor": [case(remove=("temperature_c",), fever=P, **{item: P})
                                              for item in RULES["lists"]["spinal_infection_risk_factors"]],
    "si_fever_with_new_severe_pain": [case(remove=("temperature_c",), fever=P, severe_pain=P),
                                      case(remove=("temperature_c",), fever=P, constant_unremitting_pain=P)],
    "si_risk_factor_unremitting_pain": [case(constant_unremitting_pain=P, diabetes=P)],
    "vfmt_major_trauma": [case(major_trauma=P)],
    "vff_risk_plus_event": [case(osteoporosis=P, minor_trauma=P),
                            case(long_term_systemic_corticosteroids=P, strain_or_exertion_onset=P),
                            case(age_years=PARAMS["fracture_age_over"] + 1, contusion_or_abrasion=P)],
    "aaa_collapse_shock_or_mass": [case(**{item: P}) for item in (
        "collapse_or_syncope", "hypotension_or_shock", "pulsatile_abdominal_mass")],
    "aaa_sudden_back_pain_over_50": [case(age_years=PARAMS["aaa_suspicion_age_over"] + 10, onset="sudden",
                                          systolic_bp_mmhg=130, heart_rate_bpm=80)],
    "axspa_four_or_more": [case(back_pain_onset_age_years=30, pain_duration_weeks=20, night_waking_second_half=P,
                                buttock_pain=P, improves_with_movement_or_exercise=P)],
    "axspa_three_hla_b27_positive": [case(pain_duration_weeks=20, night_waking_second_half=P, buttock_pain=P,
                                          improves_with_movement_or_exercise=P, hla_b27="positive")],
    "axspa_three_hla_b27_untested": [case(pain_duration_weeks=20, night_waking_second_half=P, buttock_pain=P,
                                          improves_with_movement_or_exercise=P, hla_b27="not-tested")],
    "sa_hot_joint_restricted_movement": [case("hip", hot_swollen_tender_joint=P, painful_restricted_hip_movement=P)],
    "sa_systemic_features_restricted_joint": [case("hip", remove=("temperature_c",), fever=P,
                                                   painful_restricted_hip_movement=P),
                                              case("hip", chills_or_rigors=P, painful_restricted_hip_movement=P)],
    "sa_prosthetic_joint": [case("hip", prosthetic_hip=P, chills_or_rigors=P)],
    "sa_kocher_adolescent": [case("hip", remove=("fever",), age_years=12, temperature_c=39.0,
                                  inability_to_bear_weight=P)],
    "hf_trauma_with_fracture_signs": [case("hip", age_years=80, minor_trauma=P, inability_to_bear_weight=P),
                                      case("hip", age_years=50, major_trauma=P, shortened_externally_rotated_leg=P)],
    "hf_older_adult_fall": [case("hip", age_years=PARAMS["older_adult_hip_fall_age_at_least"], minor_trauma=P)],
    "avn_risk_factor_with_hip_pain": [case("hip", alcohol_excess=P, groin_pain=P)],
    "scfe_examination_signs": [case("hip", age_years=13, reduced_or_painful_hip_internal_rotation=P),
                               case("back", age_years=13, knee_or_thigh_pain=P,
                                    obligatory_external_rotation_on_hip_flexion=P)],
    "scfe_limp_with_pain": [case("hip", age_years=13, limp=P)],
    "hm_cancer_history_bone_pain": [case("hip", history_of_cancer=P, night_pain=P)],
    "hm_constitutional_bone_pain": [case("hip", unexplained_weight_loss=P, rest_pain=P)],
    "hm_young_unexplained_bone_pain": [case("hip", age_years=PARAMS["bone_sarcoma_young_person_age_under"] - 1,
                                            unexplained_bone_pain_or_swelling=P)],
}


def test_every_trigger_has_a_firing_case() -> None:
    assert set(FIRING_CASES) == set(TRIGGERS)


def _assert_escalates(rec: dict, trigger: str) -> None:
    eff = TRIGGERS[trigger]
    flags = {f["id"]: f for f in rec["red_flags"]}
    assert eff["flag"] in flags, f"{trigger}: flag {eff['flag']} not named (got {sorted(flags)})"
    assert trigger in flags[eff["flag"]]["triggers"]
    want = eff.get("urgency") or RULES["red_flags"][eff["flag"]]["urgency"]
    assert URGENCY.index(flags[eff["flag"]]["urgency"]) >= URGENCY.index(want)
    assert URGENCY.index(rec["urgency"]) >= URGENCY.index(want)
    assert STEPS.index(rec["care_step"]) >= STEPS.index("medical")


@pytest.mark.parametrize(("trigger", "c"), [pytest.param(t, c, id=f"{t}-{i}")
                                            for t, cs in FIRING_CASES.items() for i, c in enumerate(cs)])
def test_trigger_fires_on_minimal_case(trigger: str, c: dict) -> None:
    rec = evaluate(c)
    _assert_escalates(rec, trigger)
    if TRIGGERS[trigger]["trigger"] == "confirm":
        assert rec["status"] == "complete"


SUSPECTS = [t for t, e in TRIGGERS.items() if e["trigger"] == "suspect"]


@pytest.mark.parametrize("trigger", SUSPECTS)
def test_suspect_trigger_requests_its_items(trigger: str) -> None:
    """With the requested items unknown, a suspect trigger holds the case at data-required and asks for them."""
    request = TRIGGERS[trigger]["request"]
    base = FIRING_CASES[trigger][0]
    c = copy.deepcopy(base)
    for item in request:
        c["findings"].pop(item, None)
    rec = evaluate(c)
    _assert_escalates(rec, trigger)
    assert rec["status"] == "data-required"
    asked = {d["item"] for d in rec["data_required"]}
    assert set(request) <= asked


# ----------------------------------------------------------------------------- numeric thresholds
def _sides(op: str, n: float, step: float) -> tuple[float, float]:
    """(a value that satisfies `x op n`, a neighbouring value that does not)."""
    return {"gt": (n + step, n), "ge": (n, n - step), "lt": (n - step, n), "le": (n, n + step)}[op]


def _boundary(trigger: str, op: str, n: float, step: float, build) -> list:
    yes, no = _sides(op, n, step)
    return [pytest.param(trigger, build(yes), True, id=f"{trigger}-{op}{n}-at-{yes}-fires"),
            pytest.param(trigger, build(no), False, id=f"{trigger}-{op}{n}-at-{no}-silent")]


BOUNDARIES = [
    # spinal malignancy: NG12 age >= 60 with weight loss (the combination rule stays below 2 items)
    *_boundary("sm_ng12_age_weight_loss", "ge", PARAMS["ng12_age_at_least"], 1,
               lambda a: case(age_years=a, unexplained_weight_loss=P)),
    # combination: weight loss + night pain + age > 50 (age the second item; below NG12 age)
    *_boundary("sm_combined_weak_flags", "gt", PARAMS["malignancy_age_over"], 1,
               lambda a: case(age_years=a, unexplained_weight_loss=P, night_pain=P)),
    # combination: count of weak flags >= 2 (weight loss + first episode + [night pain])
    pytest.param("sm_combined_weak_flags", case(age_years=45, unexplained_weight_loss=P, first_episode_back_pain=P,
                                                night_pain=P), True, id="sm_combined_weak_flags-count2-fires"),
    pytest.param("sm_combined_weak_flags", case(age_years=45, unexplained_weight_loss=P, first_episode_back_pain=P),
                 False, id="sm_combined_weak_flags-count1-silent"),
    # fragility fracture: age > 70 with a minor event
    *_boundary("vff_risk_plus_event", "gt", PARAMS["fracture_age_over"], 1,
               lambda a: case(age_years=a, minor_trauma=P)),
    # AAA: age > 50 with sudden back pain
    *_boundary("aaa_sudden_back_pain_over_50", "gt", PARAMS["aaa_suspicion_age_over"], 1,
               lambda a: case(age_years=a, onset="sudden")),
    # NG65 entry: onset before 45 (strict) and duration > 13 weeks (strict); 4 criteria
    *_boundary("axspa_four_or_more", "lt", PARAMS["ng65_onset_age_under"], 1,
               lambda a: case(age_years=50, back_pain_onset_age_years=a, pain_duration_weeks=20,
                              night_waking_second_half=P, buttock_pain=P, improves_with_movement_or_exercise=P,
                              psoriasis=P)),
    *_boundary("axspa_four_or_more", "gt", PARAMS["ng65_duration_weeks_over"], 1,
               lambda w: case(back_pain_onset_age_years=40, pain_duration_weeks=w, night_waking_second_half=P,
                              buttock_pain=P, improves_with_movement_or_exercise=P, psoriasis=P)),
    # NG65 criterion 1: onset before 35 makes the 4th criterion
    *_boundary("axspa_four_or_more", "lt", PARAMS["ng65_early_onset_age_under"], 1,
               lambda a: case(back_pain_onset_age_years=a, pain_duration_weeks=20, night_waking_second_half=P,
                              buttock_pain=P, improves_with_movement_or_exercise=P)),
    # count of criteria >= 4 vs 3 (HLA-B27 negative, so 3 criteria is no referral)
    pytest.param("axspa_four_or_more", case(pain_duration_weeks=20, night_waking_second_half=P, buttock_pain=P,
                                            improves_with_movement_or_exercise=P, enthesitis=P), True,
                 id="axspa_four_or_more-count4-fires"),
    pytest.param("axspa_four_or_more", case(pain_duration_weeks=20, night_waking_second_half=P, buttock_pain=P,
                                            improves_with_movement_or_exercise=P), False,
                 id="axspa_four_or_more-count3-silent"),
    # exactly 3 criteria with HLA-B27 positive fires; 2 does not
    pytest.param("axspa_three_hla_b27_positive", case(pain_duration_weeks=20, night_waking_second_half=P,
                                                      buttock_pain=P, hla_b27="positive"), False,
                 id="axspa_three_hla_b27_positive-count2-silent"),
    # spinal infection: fever filled from temperature >= 38.0 (unrecorded fever)
    *_boundary("si_fever_with_new_severe_pain", "ge", PARAMS["fever_present_at_or_above_c"], 0.1,
               lambda t: case(remove=("fever",), temperature_c=round(t, 1), severe_pain=P)),
    # Kocher: age < 18, temperature > 38.5, ESR > 40, WBC > 12
    *_boundary("sa_kocher_adolescent", "lt", PARAMS["kocher_adolescent_age_under"], 1,
               lambda a: case("hip", remove=("fever",), age_years=a, temperature_c=39.0, inability_to_bear_weight=P)),
    *_boundary("sa_kocher_adolescent", "gt", PARAMS["kocher_fever_c_over"], 0.1,
               lambda t: case("hip", remove=("fever",), age_years=12, temperature_c=round(t, 1),
                              inability_to_bear_weight=P)),
    *_boundary("sa_kocher_adolescent", "gt", PARAMS["kocher_esr_over"], 1,
               lambda e: case("hip", remove=("fever",), age_years=12, temperature_c=39.0, esr_mm_h=e)),
    *_boundary("sa_kocher_adolescent", "gt", PARAMS["kocher_wbc_over"], 0.1,
               lambda w: case("hip", remove=("fever",), age_years=12, temperature_c=39.0,
                              wbc_10e9_l=round(w, 1))),
    # hip fracture: older adult (>= 65) with a fall
    *_boundary("hf_older_adult_fall", "ge", PARAMS["older_adult_hip_fall_age_at_least"], 1,
               lambda a: case("hip", age_years=a, minor_trauma=P)),
    # SCFE age band 9-16 inclusive, both triggers
    *_boundary("scfe_examination_signs", "ge", PARAMS["scfe_age_min"], 1,
               lambda a: case("hip", age_years=a, reduced_or_painful_hip_internal_rotation=P)),
    *_boundary("scfe_examination_signs", "le", PARAMS["scfe_age_max"], 1,
               lambda a: case("hip", age_years=a, reduced_or_painful_hip_internal_rotation=P)),
    *_boundary("scfe_limp_with_pain", "ge", PARAMS["scfe_age_min"], 1,
               lambda a: case("hip", age_years=a, limp=P)),
    *_boundary("scfe_limp_with_pain", "le", PARAMS["scfe_age_max"], 1,
               lambda a: case("hip", age_years=a, limp=P)),
    # bone sarcoma: young person < 25
    *_boundary("hm_young_unexplained_bone_pain", "lt", PARAMS["bone_sarcoma_young_person_age_under"], 1,
               lambda a: case("hip", age_years=a, unexplained_bone_pain_or_swelling=P)),
]


@pytest.mark.parametrize(("trigger", "c", "fires"), BOUNDARIES)
def test_threshold_boundary(trigger: str, c: dict, fires: bool) -> None:
    rec = evaluate(c)
    if fires:
        _assert_escalates(rec, trigger)
    else:
        assert trigger not in fired_triggers(rec)
        assert TRIGGERS[trigger]["flag"] not in {f["id"] for f in rec["red_flags"]}, rec["red_flags"]


def test_fever_between_thresholds_is_unknown_not_negative() -> None:
    """37.3-37.9 C leaves fever unknown: the case must ask for it, never treat it as absent."""
    lo, hi = PARAMS["fever_absent_at_or_below_c"], PARAMS["fever_present_at_or_above_c"]
    rec = evaluate(case(remove=("fever",), temperature_c=round((lo + hi) / 2, 1), severe_pain=P))
    assert "si_fever_with_new_severe_pain" not in fired_triggers(rec)
    assert rec["status"] == "data-required"
    assert "fever" in {d["item"] for d in rec["data_required"]}
    rec = evaluate(case(remove=("fever",), temperature_c=lo, severe_pain=P))
    assert rec["status"] == "complete" and rec["red_flags"] == []
