"""Tests written to kill mutants that survived the clinical suite (tools/mutate_ruleset.py, tools/mutation.sh).

Each test pins documented behaviour on a red-flag or escalation path that no other test checked:

* the vocabulary as oracle: the vocabulary's own trigger and screen conditions decide which red-flag
  triggers fire and which screen items are asked, on the minimal firing cases, the threshold cases, the
  screen cases and their one-fact neighbours (each fact the condition reads, around each threshold, and
  each member of an any-present group swapped in) - the ruleset says it takes them from the vocabulary;
* region scoping: ``context.region`` decides which red flags apply (README "The case file"; the
  vocabulary's ``pathologies[].region``): a patient with back *and* hip pain (``both``) gets every red
  flag of either region, and a flag of one region never fires for a patient with only the other one;
* a suspect trigger's requested items are asked *because of the suspicion* (DataItem.rule_id is the
  trigger), also when a routine screen lists the same item;
* the conditional screens of the vocabulary (``required_screen.conditional``) hold a case at
  data-required while one of their items is unknown;
* every weak flag counts towards the combined malignancy trigger; an improved trial is not one;
* pathway logic (cds.pathway.combine/guard): exact urgency per trigger, referral target of the most
  urgent flag, status with confirm/suspect/screen, content shown beside an escalation, the surgery
  gate and the runtime guard (on rulesets edited in memory where the shipped one cannot reach a branch);
* parser messages and derived facts the above rely on.

Expectations come from the vocabulary fixture, from the shipped ruleset file as read from disk (never the
ruleset under test, which tools/mutate_ruleset.py swaps in through the registry), or are written out here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

import cds
from cds.pathway import CareStep, Status, Urgency
from tests.test_red_flag_boundaries import (
    FIRING_CASES,
    PARAMS,
    TRIGGERS,
    _assert_escalates,
    case,
    evaluate,
    fired_triggers,
)

P = "present"
VOCAB = yaml.safe_load((Path(__file__).parent / "fixtures" / "vocabulary.yaml").read_text(encoding="utf-8"))
FLAG_REGION = {p["id"]: p["region"] for p in VOCAB["pathologies"] if p["kind"] == "red-flag"}
# findings through which the vocabulary lets a flag of one region be suspected from the other:
# SCFE presents as knee or thigh pain (scfe_pain_site), an AAA as abdominal pain
REFERRED = ("knee_or_thigh_pain", "abdominal_pain")


def _flags(rec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["id"]: f for f in rec["red_flags"]}


def _with_region(c: dict[str, Any], region: str) -> dict[str, Any]:
    out = copy.deepcopy(c)
    out["context"]["region"] = region
    out["case_id"] = f"{c.get('case_id', 'case')}-{region}"
    return out


ALL_FIRING = [pytest.param(t, c, id=f"{t}-{i}") for t, cs in FIRING_CASES.items() for i, c in enumerate(cs)]


# ----------------------------------------------------------------------------------- regions
@pytest.mark.parametrize(("trigger", "c"), ALL_FIRING)
def test_back_and_hip_pain_gets_every_red_flag(trigger: str, c: dict[str, Any]) -> None:
    """region ``both``: the red flags of both regions apply (a 'both' dropped from back_region/hip_region)."""
    _assert_escalates(evaluate(_with_region(c, "both")), trigger)


@pytest.mark.parametrize(("trigger", "c"), ALL_FIRING)
def test_a_red_flag_never_fires_for_the_other_region(trigger: str, c: dict[str, Any]) -> None:
    flag = TRIGGERS[trigger]["flag"]
    own = FLAG_REGION[flag]
    if any(c["findings"].get(f) == P for f in REFERRED):
        pytest.skip("referred pain: the vocabulary suspects this flag from the other region too")
    other = {"back": "hip", "hip": "back"}[own]
    rec = evaluate(_with_region(c, other))
    assert trigger not in fired_triggers(rec)
    assert flag not in _flags(rec), f"{flag} ({own}) raised for a {other}-only case"


def test_every_red_flag_has_a_vocabulary_region() -> None:
    assert {e["flag"] for e in TRIGGERS.values()} <= set(FLAG_REGION)


# ----------------------------------------------------------------------------------- suspect triggers
SUSPECTS = sorted(t for t, e in TRIGGERS.items() if e["trigger"] == "suspect")


@pytest.mark.parametrize("trigger", SUSPECTS)
def test_requested_items_are_asked_because_of_the_suspicion(trigger: str) -> None:
    """Each unanswered requested item is attributed to the suspect trigger, even when a screen lists it too."""
    request = TRIGGERS[trigger]["request"]
    c = copy.deepcopy(FIRING_CASES[trigger][0])
    for item in request:
        c["findings"].pop(item, None)
    rec = evaluate(c)
    assert rec["status"] == "data-required"
    by_item = {d["item"]: d for d in rec["data_required"]}
    for item in request:
        assert item in by_item, f"{item} not asked"
        assert by_item[item]["rule_id"] == trigger, f"{item} asked by {by_item[item]['rule_id']}, not {trigger}"
        assert rec["red_flags"] and by_item[item]["reason"].startswith("asked or examined now")


@pytest.mark.parametrize("trigger", SUSPECTS)
def test_each_requested_item_alone_holds_the_suspicion_open(trigger: str) -> None:
    request = TRIGGERS[trigger]["request"]
    for item in request:
        c = copy.deepcopy(FIRING_CASES[trigger][0])
        c["findings"].pop(item, None)
        rec = evaluate(c)
        _assert_escalates(rec, trigger)
        assert rec["status"] == "data-required", item
        assert item in {d["item"] for d in rec["data_required"]}


# ----------------------------------------------------------------------------------- conditional screens
SCREENS = {s["id"]: s for s in VOCAB["required_screen"]["conditional"]}
# a case where the screen's condition holds and no red-flag trigger fires (all items answered)
SCREEN_CASES: dict[str, dict[str, Any]] = {
    "leg_symptom_side": case(leg_pain=P),
    "fragility_fracture_screen": case(long_term_systemic_corticosteroids=P),
    "infection_risk_screen": case(constant_unremitting_pain=P),
    "older_new_pain_malignancy_screen": case(age_years=PARAMS["malignancy_age_over"] + 3, first_episode_back_pain=P),
    "aaa_screen": case(age_years=PARAMS["aaa_suspicion_age_over"] + 3, onset="sudden", systolic_bp_mmhg=130,
                       heart_rate_bpm=80),
    "hip_fall_screen": case("hip", age_years=40, minor_trauma=P),
    "adolescent_hip_screen": case("hip", age_years=12),
    "acute_hip_pain_screen": case("hip", pain_duration_weeks=1),
}


def test_every_conditional_screen_has_a_case() -> None:
    assert set(SCREEN_CASES) == set(SCREENS)


@pytest.mark.parametrize("screen", sorted(SCREENS))
def test_conditional_screen_base_case_is_complete(screen: str) -> None:
    rec = evaluate(SCREEN_CASES[screen])
    assert rec["status"] == "complete", rec["data_required"]
    assert rec["red_flags"] == [] or screen == "aaa_screen"  # a sudden onset over 50 is itself an AAA suspicion


@pytest.mark.parametrize(("screen", "item"), [(s, i) for s in sorted(SCREENS) for i in SCREENS[s]["require"]])
def test_conditional_screen_item_unknown_is_data_required(screen: str, item: str) -> None:
    c = copy.deepcopy(SCREEN_CASES[screen])
    c["findings"].pop(item, None)
    if item == "bilateral_leg_symptoms":
        c["context"].pop("leg_symptom_laterality", None)  # laterality would answer it (satisfied_by)
    rec = evaluate(c)
    assert rec["status"] == "data-required", f"{item} unknown under {screen} but the result is complete"
    assert item in {d["item"] for d in rec["data_required"]}


# ----------------------------------------------------------------------------------- combined malignancy flags
WEAK = {"no_improvement": {"treatments": [{"step": "self-care", "weeks": 6, "outcome": "no-improvement"}]},
        "first_episode": {"first_episode_back_pain": P}, "night_pain": {"night_pain": P},
        "older": {"age_years": PARAMS["malignancy_age_over"] + 1}}


def _weak_case(*names: str) -> dict[str, Any]:
    c = case(age_years=45, unexplained_weight_loss=P, pain_duration_weeks=8)
    for n in names:
        for k, v in WEAK[n].items():
            if k == "treatments":
                c["treatments"] = copy.deepcopy(v)
            else:
                (c["context"] if k == "age_years" else c["findings"])[k] = v
    return c


@pytest.mark.parametrize("pair", [("no_improvement", "night_pain"), ("no_improvement", "first_episode"),
                                  ("older", "no_improvement"), ("first_episode", "night_pain")])
def test_any_two_weak_flags_with_weight_loss_raise_spinal_malignancy(pair: tuple[str, str]) -> None:
    rec = evaluate(_weak_case(*pair))
    _assert_escalates(rec, "sm_combined_weak_flags")


@pytest.mark.parametrize("single", sorted(WEAK))
def test_one_weak_flag_with_weight_loss_is_not_enough(single: str) -> None:
    assert "sm_combined_weak_flags" not in fired_triggers(evaluate(_weak_case(single)))


# ----------------------------------------------------------------------------------- pathway
def test_cds_evaluate_uses_the_patched_registry_smoke() -> None:
    """Sanity: the helpers above evaluate through cds.evaluate (what the mutation harness redirects)."""
    assert isinstance(cds.evaluate(case(), version="1.0.0"), cds.Recommendation)
    assert Status.COMPLETE.rank < Status.DATA_REQUIRED.rank and Urgency.ROUTINE < Urgency.EMERGENCY
    assert CareStep.MEDICAL < CareStep.SURGICAL_REFERRAL


# ----------------------------------------------------------------------------------- urgency (vocabulary)
VOCAB_TRIGGERS = {t["id"]: {**t, "flag": f["id"]} for f in VOCAB["red_flags"] for t in f["triggers"]}
URGENCY = ["routine", "urgent", "emergency"]


def _expected_urgencies(rec: dict[str, Any]) -> tuple[str, dict[str, str]]:
    per_flag: dict[str, str] = {}
    for f in rec["red_flags"]:
        for t in f["triggers"]:
            u = VOCAB_TRIGGERS[t]["urgency"]
            if URGENCY.index(u) > URGENCY.index(per_flag.get(f["id"], "routine")):
                per_flag[f["id"]] = u
            per_flag.setdefault(f["id"], u)
    top = max(per_flag.values(), key=URGENCY.index, default="routine")
    return top, per_flag


def test_every_ruleset_trigger_is_in_the_vocabulary() -> None:
    assert set(TRIGGERS) <= set(VOCAB_TRIGGERS)


@pytest.mark.parametrize(("trigger", "c"), ALL_FIRING)
def test_urgency_is_exactly_that_of_the_fired_triggers(trigger: str, c: dict[str, Any]) -> None:
    """Neither lower (unsafe) nor higher (an urgent suspicion is not an emergency) than the vocabulary's."""
    rec = evaluate(c)
    top, per_flag = _expected_urgencies(rec)
    assert rec["urgency"] == top
    for f in rec["red_flags"]:
        assert f["urgency"] == per_flag[f["id"]], f["id"]
    most = [f for f in rec["red_flags"] if f["urgency"] == top]
    assert rec["referral_target"] == most[0]["referral_target"]  # the first flag of the highest urgency


def test_referral_target_follows_the_most_urgent_flag() -> None:
    # spinal malignancy (urgent, oncology) + vertebral fracture after major trauma (emergency, ED)
    rec = evaluate(case(history_of_cancer=P, major_trauma=P))
    flags = _flags(rec)
    assert {"spinal_malignancy", "vertebral_fracture_major_trauma"} <= set(flags)
    assert rec["urgency"] == "emergency"
    assert rec["referral_target"] == flags["vertebral_fracture_major_trauma"]["referral_target"]
    assert rec["referral_target"] != flags["spinal_malignancy"]["referral_target"]
    # and with the urgent flag alone, its own target
    alone = evaluate(case(history_of_cancer=P))
    assert alone["referral_target"] == _flags(alone)["spinal_malignancy"]["referral_target"]


def test_a_flag_with_an_urgent_and_an_emergency_trigger_takes_the_emergency() -> None:
    # spinal infection: fever + severe pain (urgent) and fever + IV drug use (emergency), both fired
    rec = evaluate(case(remove=("temperature_c",), fever=P, severe_pain=P, iv_drug_use=P))
    flag = _flags(rec)["spinal_infection"]
    assert {"si_fever_with_new_severe_pain", "si_systemic_features_with_risk_factor"} <= set(flag["triggers"])
    assert flag["urgency"] == rec["urgency"] == "emergency"
    urgent_only = evaluate(case(remove=("temperature_c",), fever=P, severe_pain=P))
    assert _flags(urgent_only)["spinal_infection"]["urgency"] == urgent_only["urgency"] == "urgent"


# ----------------------------------------------------------------------------------- status
def test_an_emergency_confirm_completes_despite_a_pending_suspicion() -> None:
    """CES confirmed (emergency) + AAA suspected with its checks undone: act now, don't wait for data."""
    c = case(new_urinary_retention=P, age_years=PARAMS["aaa_suspicion_age_over"] + 10, onset="sudden",
             remove=("systolic_bp_mmhg", "heart_rate_bpm", "pulsatile_abdominal_mass"))
    rec = evaluate(c)
    assert {"cauda_equina_syndrome", "abdominal_aortic_aneurysm"} <= set(_flags(rec))
    assert rec["status"] == "complete" and rec["urgency"] == "emergency"
    assert rec["data_required"] == []


def test_an_urgent_confirm_beside_a_pending_suspicion_asks_for_the_data() -> None:
    c = case(history_of_cancer=P, age_years=PARAMS["aaa_suspicion_age_over"] + 5, onset="sudden",
             remove=("pulsatile_abdominal_mass",))
    rec = evaluate(c)
    assert {"spinal_malignancy", "abdominal_aortic_aneurysm"} <= set(_flags(rec))
    assert rec["status"] == "data-required"
    asked = {d["item"]: d["rule_id"] for d in rec["data_required"]}
    assert asked.get("pulsatile_abdominal_mass") == "aaa_sudden_back_pain_over_50"


def test_a_suspicion_with_its_items_answered_negative_is_complete() -> None:
    rec = evaluate(case(age_years=PARAMS["aaa_suspicion_age_over"] + 5, onset="sudden", systolic_bp_mmhg=130,
                        heart_rate_bpm=80))
    assert "abdominal_aortic_aneurysm" in _flags(rec)
    assert rec["status"] == "complete" and rec["data_required"] == []


def test_a_confirmed_flag_supersedes_the_screen() -> None:
    """Non-emergency confirmed flag, nothing pending: the routine screen is not asked (the receiving team does it)."""
    rec = evaluate(case(history_of_cancer=P, remove=("fever", "temperature_c", "saddle_anesthesia")))
    assert "spinal_malignancy" in _flags(rec)
    assert rec["status"] == "complete" and rec["data_required"] == []


def test_the_screen_is_asked_beside_a_pending_suspicion() -> None:
    c = case(age_years=PARAMS["aaa_suspicion_age_over"] + 5, onset="sudden", remove=(
        "pulsatile_abdominal_mass", "saddle_anesthesia"))
    rec = evaluate(c)
    asked = {d["item"]: d["rule_id"] for d in rec["data_required"]}
    assert rec["status"] == "data-required"
    assert asked.get("pulsatile_abdominal_mass") == "aaa_sudden_back_pain_over_50"
    assert asked.get("saddle_anesthesia") == "screen_universal_back"


def test_answered_request_items_are_not_asked_again() -> None:
    rec = evaluate(case(age_years=PARAMS["aaa_suspicion_age_over"] + 5, onset="sudden", remove=("heart_rate_bpm",),
                        systolic_bp_mmhg=130))
    assert [d["item"] for d in rec["data_required"]] == ["heart_rate_bpm"]


# ----------------------------------------------------------------------------------- escalated content
@pytest.mark.parametrize(("trigger", "c"), ALL_FIRING)
def test_an_escalated_case_shows_no_routine_advice_or_lower_care_step(trigger: str, c: dict[str, Any]) -> None:
    from cds.rulesets import load_ruleset

    rs = load_ruleset("back-hip-pain", "1.0.0")
    rec = evaluate(c)
    steps = ["self-care", "physical-therapy", "medical", "surgical-referral"]
    for r in rec["reasons"]:
        rule = rs.rules_by_id.get(r["rule_id"])
        if rule is None:
            continue
        eff = rule.effect
        assert eff.get("scope", "always") == "always" or eff["type"] not in ("advice", "caution"), r["rule_id"]
        if eff["type"] == "care-step":
            assert steps.index(eff["step"]) >= steps.index(rec["care_step"]), r["rule_id"]
    routine = {r.id for r in rs.rules if r.effect.get("scope", "always") != "always"}
    assert not {a["rule_id"] for a in rec["advice"]} & routine
    assert not {x["rule_id"] for x in rec["cautions"]} & routine


@pytest.mark.parametrize(("trigger", "c"), ALL_FIRING)
def test_a_flag_cites_its_present_findings_only(trigger: str, c: dict[str, Any]) -> None:
    rec = evaluate(c)
    flag = _flags(rec)[TRIGGERS[trigger]["flag"]]
    values = {**c["context"], **c["findings"]}
    assert "region" not in flag["findings"]
    for f in flag["findings"]:
        assert values.get(f, "derived") not in ("absent", "unknown"), f
    present = [k for k, v in c["findings"].items() if v == P]
    assert flag["findings"] and (not present or set(present) & set(flag["findings"])), (present, flag["findings"])


# ----------------------------------------------------------------------------------- surgery gate and guard
def _ruleset_with(rule: dict[str, Any]) -> Any:
    from cds.rulesets import compile_ruleset

    doc = yaml.safe_load((Path(__file__).parents[1] / "rulesets" / "back-hip-pain" / "1.0.0.yaml")
                         .read_text(encoding="utf-8"))
    doc["rules"].append(rule)
    return compile_ruleset(doc, sha256="0" * 64, path="test-surgery-gate.yaml")


SURGERY_WITHOUT_GATE = {"id": "test_surgery_without_gate", "title": "A faulty rule: surgery with no gate",
                        "when": {"ref": "back_region"}, "sources": ["NICE-NG59"],
                        "effect": {"type": "care-step", "step": "surgical-referral",
                                   "message": "Refer for surgery.", "referral_target": "spinal-surgery"}}
FAILED_CONSERVATIVE = [{"step": "physical-therapy", "weeks": 8, "outcome": "no-improvement"},
                       {"step": "medical", "weeks": 8, "outcome": "worse"}]


@pytest.mark.parametrize("engine", ["reference", "durable-rules"])
def test_surgery_gate_holds_a_faulty_surgical_rule_at_medical(engine: str) -> None:
    ev = cds.Evaluator(_ruleset_with(SURGERY_WITHOUT_GATE), engine=engine)
    rec = ev.evaluate(case())
    assert rec.care_step is CareStep.MEDICAL
    assert "cds.surgery_last_resort" in {r.rule_id for r in rec.reasons}
    assert rec.referral_target is None  # the held-back proposal's target is not offered
    c = case()
    c["treatments"] = [dict(t) for t in FAILED_CONSERVATIVE[:1]]  # physical therapy alone is not enough
    assert ev.evaluate(c).care_step is CareStep.MEDICAL
    c["treatments"] = copy.deepcopy(FAILED_CONSERVATIVE)
    done = ev.evaluate(c)
    assert done.care_step is CareStep.SURGICAL_REFERRAL and done.referral_target == "spinal-surgery"
    assert "cds.surgery_last_resort" not in {r.rule_id for r in done.reasons}
    c["treatments"].append({"step": "self-care", "weeks": 2, "outcome": "improved"})
    assert ev.evaluate(c).care_step is CareStep.MEDICAL  # an improvement undoes "conservative care failed"


def test_surgery_gate_with_a_red_flag_escalates_and_holds_surgery() -> None:
    ev = cds.Evaluator(_ruleset_with(SURGERY_WITHOUT_GATE), engine="reference")
    rec = ev.evaluate(case(major_trauma=P))
    assert rec.red_flags and rec.care_step is CareStep.MEDICAL and rec.urgency is Urgency.EMERGENCY
    assert rec.referral_target == rec.red_flags[0].referral_target


def test_guard_refuses_a_red_flag_below_its_urgency_or_step() -> None:
    import attrs

    from cds.errors import EngineError
    from cds.pathway import guard

    rec = cds.evaluate(case(major_trauma=P), version="1.0.0")
    guard(rec)  # a correct one passes
    for bad in (attrs.evolve(rec, urgency=Urgency.URGENT), attrs.evolve(rec, urgency=Urgency.ROUTINE),
                attrs.evolve(rec, care_step=CareStep.PHYSICAL_THERAPY),
                attrs.evolve(rec, care_step=CareStep.SELF_CARE)):
        with pytest.raises(EngineError, match="safety guard"):
            guard(bad)
    calm = cds.evaluate(case(), version="1.0.0")
    guard(attrs.evolve(calm, care_step=CareStep.SELF_CARE, urgency=Urgency.ROUTINE))  # no red flag: nothing to guard


# ----------------------------------------------------------------------------------- the vocabulary as oracle
# The ruleset says its red-flag triggers and screens are the vocabulary's, with the same ids and conditions.
# Checked by behaviour: the vocabulary's own conditions (parsed from tests/fixtures/vocabulary.yaml with its
# named conditions and default parameters) decide which triggers must fire and which screen items must be
# asked, on the minimal firing cases, the threshold cases and their one-fact neighbours.
def _vocab_oracle() -> dict[str, Any]:
    from cds import conditions as C
    from cds.rulesets import fact_kinds

    shipped = yaml.safe_load((Path(__file__).parents[1] / "rulesets" / "back-hip-pain" / "1.0.0.yaml")
                             .read_text(encoding="utf-8"))
    params = {k: v["value"] for k, v in shipped["parameters"].items()}   # only for derived facts the
    params.update({k: v["default"] for k, v in VOCAB["parameters"].items()})  # vocabulary does not set
    ctx = C.ParseContext(kinds=fact_kinds(), parameters=params, lists={}, conditions=VOCAB["named_conditions"])
    triggers = {t: C.parse(spec["when"], ctx, t) for t, spec in VOCAB_TRIGGERS.items()}
    screens = {s["id"]: (C.parse({"all": [{"ref": f"{s['region']}_region"}, s["when"]]}, ctx, s["id"]), s["require"])
               for s in VOCAB["required_screen"]["conditional"]}
    for region, items in VOCAB["required_screen"]["universal"].items():
        screens[f"universal_{region}"] = (C.parse({"ref": f"{region}_region"}, ctx, region), items)
    assert not ctx.problems, ctx.problems
    return {"params": params, "kinds": ctx.kinds,
            "triggers": {t: (n, C.compile_predicate(n)) for t, n in triggers.items()},
            "screens": {s: (n, C.compile_predicate(n), req) for s, (n, req) in screens.items()}}


ORACLE = _vocab_oracle()


def _constants(node: Any, fact: str, out: set[float]) -> set[float]:
    from cds import conditions as C

    if isinstance(node, C.Cmp) and node.fact == fact:
        out.add(node.value)
    for child in getattr(node, "items", ()) or ((node.item,) if isinstance(node, C.Not) else ()):
        _constants(child, fact, out)
    return out


def _neighbours(c: dict[str, Any], node: Any) -> list[dict[str, Any]]:
    """c with one fact the condition reads changed to each of its values (numbers: around each threshold)."""
    from cds import conditions as C
    from cds.facts import catalogue

    cat = catalogue()
    out = [c]
    for region in ("back", "hip", "both"):
        if c["context"]["region"] != region:
            out.append(_with_region(c, region))
    for fact in C.facts_of(node):
        section = "context" if fact in cat.context else ("findings" if fact in cat.findings else None)
        if section is None or fact == "region":
            continue  # derived facts are reached through their inputs in the base cases
        spec = ORACLE["kinds"][fact]
        if spec["kind"] == "number":
            values: list[Any] = []
            for n in sorted(_constants(node, fact, set())):
                step = 1 if float(n).is_integer() else 0.1
                values += [round(n - step, 3), n, round(n + step, 3)]
        else:
            values = [v for v in spec.get("values", ()) if v != "unknown"]
        for v in [*values, None]:
            d = copy.deepcopy(c)
            if v is None:
                d[section].pop(fact, None)
                if fact == "fever":
                    d["findings"].pop("temperature_c", None)
                if fact == "bilateral_leg_symptoms":
                    d["context"].pop("leg_symptom_laterality", None)
            else:
                d[section][fact] = v
            out.append(d)
    # derived facts: through their inputs, around the vocabulary's thresholds
    vp = ORACLE["params"]
    derived_inputs = {
        "ng65_entry": [("back_pain_onset_age_years", vp["ng65_onset_age_under"]),
                       ("pain_duration_weeks", vp["ng65_duration_weeks_over"])],
        "ng65_onset_before_35": [("back_pain_onset_age_years", vp["ng65_early_onset_age_under"])],
        "fever": [("temperature_c", vp["fever_present_at_or_above_c"]), ("temperature_c", vp["fever_absent_at_or_below_c"])],
    }
    read = set(C.facts_of(node))
    for fact, inputs in derived_inputs.items():
        if fact not in read:
            continue
        for inp, n in inputs:
            section = "context" if inp in cat.context else "findings"
            step = 1 if float(n).is_integer() else 0.1
            for v in (round(n - step, 3), n, round(n + step, 3)):
                d = copy.deepcopy(c)
                d[section][inp] = v
                if fact == "fever":
                    d["findings"].pop("fever", None)
                out.append(d)
    if "no_improvement_after_4_weeks" in read:
        weeks = vp["no_improvement_trial_weeks"]
        for t in ([], [{"step": "self-care", "weeks": weeks, "outcome": "no-improvement"}],
                  [{"step": "self-care", "weeks": weeks - 1, "outcome": "worse"}],
                  [{"step": "physical-therapy", "weeks": weeks + 2, "outcome": "improved"}]):
            d = copy.deepcopy(c)
            d["treatments"] = t
            out.append(d)
    # swaps: a present finding of the case replaced by another tri-state finding the condition reads
    # (each member of an any_present group must be able to fire the trigger on its own)
    tri = [f for f in C.facts_of(node) if f in cat.findings and ORACLE["kinds"][f]["kind"] == "tri_state"]
    for p in [f for f in tri if c["findings"].get(f) == P]:
        for q in tri:
            if q != p and c["findings"].get(q) != P:
                d = copy.deepcopy(c)
                d["findings"][p], d["findings"][q] = "absent", P
                out.append(d)
    return out


def _oracle_cases() -> list[Any]:
    from tests.test_red_flag_boundaries import BOUNDARIES

    bases: list[tuple[str, dict[str, Any]]] = [(t, c) for t, cs in FIRING_CASES.items() for c in cs]
    bases += [(p.values[0], p.values[1]) for p in BOUNDARIES]
    bases += [(s, c) for s, c in SCREEN_CASES.items()]
    for s, c in SCREEN_CASES.items():  # the screen firing with an item unknown: its condition decides what is asked
        for item in dict.fromkeys((SCREENS[s]["require"][0], SCREENS[s]["require"][-1])):
            d = copy.deepcopy(c)
            d["findings"].pop(item, None)
            if item == "bilateral_leg_symptoms":
                d["context"].pop("leg_symptom_laterality", None)  # laterality would answer it
            bases.append((s, d))
    older = case(age_years=PARAMS["malignancy_age_over"] + 3, remove=("night_pain",))
    older["treatments"] = [{"step": "self-care", "weeks": 6, "outcome": "no-improvement"}]
    # referred presentations the vocabulary routes across regions: an AAA felt as abdominal pain in a hip patient
    bases += [("aaa_collapse_shock_or_mass", case("hip", abdominal_pain=P, collapse_or_syncope=P))]
    bases += [("older_new_pain_malignancy_screen", older),
              ("fragility_fracture_screen", case(age_years=PARAMS["fracture_age_over"] + 1, remove=("minor_trauma",)))]
    bases += [("weak", _weak_case(*pair)) for pair in (("no_improvement", "night_pain"), ("older", "first_episode"))]
    out = []
    for i, (name, c) in enumerate(bases):
        node = ORACLE["triggers"][name][0] if name in ORACLE["triggers"] else (
            ORACLE["screens"][name][0] if name in ORACLE["screens"] else None)
        cases = _neighbours(c, node) if node is not None else [c]
        out.append(pytest.param(cases, id=f"{name}-{i}"))
    return out


def _vocab_values(c: dict[str, Any]) -> dict[str, Any]:
    from cds.facts import PatientFacts
    from cds.scores import derive

    return derive(PatientFacts.from_dict(c), ORACLE["params"])


@pytest.mark.parametrize("cases", _oracle_cases())
def test_red_flag_triggers_and_screens_behave_as_the_vocabulary_defines(cases: list[dict[str, Any]]) -> None:
    from cds.pathway import NOT_DONE

    problems = []
    for c in cases:
        rec = evaluate(c)
        values = _vocab_values(c)
        want = {t for t, (_, pred) in ORACLE["triggers"].items() if pred(values) is True}
        got = fired_triggers(rec)
        where = f"{c['context']} {sorted(k for k, v in c['findings'].items() if v != 'absent')}"
        if got != want:
            problems.append(f"{where}: fired {sorted(got - want)} not in the vocabulary, missing {sorted(want - got)}")
        if not rec["red_flags"]:
            asked = {d["item"] for d in rec["data_required"]}
            expect = {i for _, pred, req in ORACLE["screens"].values() if pred(values) is True for i in req
                      if values.get(i, "unknown") in NOT_DONE}
            if asked != expect:
                problems.append(f"{where}: asked {sorted(asked - expect)} not in the vocabulary's screens, "
                                f"not asked {sorted(expect - asked)}")
            assert (rec["status"] == "data-required") == bool(expect), where
    assert not problems, "\n".join(problems[:10])


# ----------------------------------------------------------------------------------- flag content
VOCAB_FLAGS = {f["id"]: f for f in VOCAB["red_flags"]}


@pytest.mark.parametrize(("trigger", "c"), ALL_FIRING)
def test_a_flag_carries_its_label_action_targets_and_sources(trigger: str, c: dict[str, Any]) -> None:
    from cds.rulesets import load_ruleset

    rs = load_ruleset("back-hip-pain", "1.0.0")
    flag = _flags(evaluate(c))[TRIGGERS[trigger]["flag"]]
    voc = VOCAB_FLAGS[flag["id"]]
    assert flag["label"] == voc["label"]
    assert " ".join(flag["action"].split()) == " ".join(voc["action"].split())
    assert flag["alternative_targets"] == list(voc.get("alternative_targets", []))
    assert flag["referral_target"] in {voc["referral_target"], *voc.get("alternative_targets", [])}
    assert flag["sources"][:len(voc["sources"])] == voc["sources"]  # the category's sources first
    assert all(isinstance(s, str) and s in rs.sources for s in flag["sources"])
    assert len(flag["sources"]) == len(set(flag["sources"]))


# ----------------------------------------------------------------------------------- pathway on edited rulesets
def _edited(edit: Any) -> Any:
    from cds.rulesets import compile_ruleset

    doc = yaml.safe_load((Path(__file__).parents[1] / "rulesets" / "back-hip-pain" / "1.0.0.yaml")
                         .read_text(encoding="utf-8"))
    edit(doc)
    return cds.Evaluator(compile_ruleset(doc, sha256="0" * 64, path="test-edited.yaml"), engine="reference")


def _rule(doc: dict[str, Any], rid: str) -> dict[str, Any]:
    return next(r for r in doc["rules"] if r["id"] == rid)


def test_a_trigger_without_its_own_urgency_takes_the_flags() -> None:
    def edit(doc: dict[str, Any]) -> None:
        for rid in ("vfmt_major_trauma", "sm_history_of_cancer"):
            del _rule(doc, rid)["effect"]["urgency"]
    ev = _edited(edit)
    assert ev.evaluate(case(major_trauma=P)).urgency is Urgency.EMERGENCY
    assert ev.evaluate(case(history_of_cancer=P)).urgency is Urgency.URGENT


def test_a_later_more_urgent_trigger_raises_the_flag_and_sets_its_target() -> None:
    """Trigger order must not matter: urgent trigger first, emergency trigger (own target) second."""
    def edit(doc: dict[str, Any]) -> None:
        rules = doc["rules"]
        urgent = _rule(doc, "si_fever_with_new_severe_pain")
        rules.remove(urgent)
        rules.insert(rules.index(_rule(doc, "si_systemic_features_with_risk_factor")), urgent)
        _rule(doc, "si_systemic_features_with_risk_factor")["effect"]["referral_target"] = "spinal-surgery"
    ev = _edited(edit)
    rec = ev.evaluate(case(remove=("temperature_c",), fever=P, severe_pain=P, iv_drug_use=P))
    flag = next(f for f in rec.red_flags if f.id == "spinal_infection")
    assert flag.triggers[0] == "si_fever_with_new_severe_pain"
    assert flag.urgency is Urgency.EMERGENCY and rec.urgency is Urgency.EMERGENCY
    assert flag.referral_target == "spinal-surgery" == rec.referral_target
    urgent_only = ev.evaluate(case(remove=("temperature_c",), fever=P, severe_pain=P))
    assert urgent_only.urgency is Urgency.URGENT and urgent_only.referral_target == "emergency-department"


def test_a_red_flag_can_raise_the_care_step() -> None:
    def edit(doc: dict[str, Any]) -> None:
        _rule(doc, "vfmt_major_trauma")["effect"]["care_step"] = "surgical-referral"
    ev = _edited(edit)
    assert ev.evaluate(case(major_trauma=P)).care_step is CareStep.SURGICAL_REFERRAL
    assert ev.evaluate(case(history_of_cancer=P)).care_step is CareStep.MEDICAL


# ----------------------------------------------------------------------------------- always-shown content
@pytest.mark.parametrize(("trigger", "c"), ALL_FIRING)
def test_safety_advice_and_cautions_stay_beside_an_escalation(trigger: str, c: dict[str, Any]) -> None:
    """Advice and cautions without a scope ("always") are shown, and explained, also when the case escalates."""
    rec = evaluate(c)
    reasons = {r["rule_id"] for r in rec["reasons"]}
    advice = {a["rule_id"] for a in rec["advice"]}
    region = c["context"]["region"]
    safety_net = "advice_back_cauda_equina_safety_net" if region == "back" else "advice_hip_safety_net"
    assert safety_net in advice and safety_net in reasons
    if TRIGGERS[trigger]["flag"] == "septic_arthritis_hip" and (
            c["findings"].get("hot_swollen_tender_joint") == P or c["findings"].get("painful_restricted_hip_movement") == P):
        cautions = {x["rule_id"]: x for x in rec["cautions"]}
        assert "caution_septic_hip_aspirate_before_antibiotics" in cautions
        assert "caution_septic_hip_aspirate_before_antibiotics" in reasons
        assert "antibiotics-before-aspiration" in cautions["caution_septic_hip_aspirate_before_antibiotics"]["do_not"]


def test_held_back_surgery_is_explained() -> None:
    ev = cds.Evaluator(_ruleset_with(SURGERY_WITHOUT_GATE), engine="reference")
    d = ev.evaluate(case()).to_dict()
    held = [r for r in d["reasons"] if r["rule_id"] == "cds.surgery_last_resort"]
    assert len(held) == 1 and "held back" in held[0]["message"] and held[0]["effect"] == "care-step"
    assert held[0]["title"] == "Surgery is the last resort"


def test_recommendation_keeps_the_case_id_and_weak_flag_pathology() -> None:
    c = case(age_years=PARAMS["malignancy_age_over"] + 5)
    c["case_id"] = "killer-case-17"
    rec = evaluate(c)
    assert rec["case_id"] == "killer-case-17"
    vocab_weak = {w["id"]: w for w in VOCAB["weak_flags"]} if isinstance(VOCAB["weak_flags"], list) else {}
    assert rec["weak_flags"], "age over 50 is a recorded weak flag"
    for w in rec["weak_flags"]:
        assert w["pathology"], w
        if w["id"] in vocab_weak and vocab_weak[w["id"]].get("pathology"):
            assert w["pathology"] == vocab_weak[w["id"]]["pathology"]


# ----------------------------------------------------------------------------------- parser messages
def test_parser_names_the_problem() -> None:
    from cds import conditions as C
    from cds.rulesets import fact_kinds

    ctx = C.ParseContext(kinds=fact_kinds(), parameters={}, lists={}, conditions={})
    C.parse({"all": [{"any_present": ["no_such_fact", "age_years"]}, {"fact": "age_years", "gt": "fifty"}]},
            ctx, "$.when")
    messages = {p.path: p.message for p in ctx.problems}
    assert messages == {"$.when.all[0].any_present[0]": "unknown fact id 'no_such_fact'",
                        "$.when.all[0].any_present[1]": "age_years is number: present-tests need tri-state facts",
                        "$.when.all[1].gt": "expected a number or {param: NAME}"}, messages


def test_parser_reports_malformed_conditions_with_their_paths() -> None:
    from cds import conditions as C
    from cds.rulesets import fact_kinds

    ctx = C.ParseContext(kinds=fact_kinds(), parameters={}, lists={},
                         conditions={"back_region": {"fact": "region", "in": ["back", "both"]}})
    for i, raw in enumerate([{"count_present": ["fever"]}, {"count": [], "ge": 1},
                             {"count": [{"fact": "nope", "is": "present"}], "ge": 1}, {"all": []},
                             {"ref": "back_region", "extra": 1}, {"ref": "nowhere"}]):
        C.parse(raw, ctx, f"$.c{i}")
    assert [(p.path, p.message) for p in ctx.problems] == [
        ("$.c0", "expected exactly one of gt, ge, eq, le, lt"),
        ("$.c1.count", "expected a non-empty list of conditions"),
        ("$.c2.count[0].fact", "unknown fact id 'nope'"),
        ("$.c3.all", "expected a non-empty list of conditions"),
        ("$.c4.extra", "unexpected key in this condition"),
        ("$.c5.ref", "unknown named condition 'nowhere'")]


def test_parser_reports_bad_counts_and_states() -> None:
    from cds import conditions as C
    from cds.rulesets import fact_kinds

    ctx = C.ParseContext(kinds=fact_kinds(), parameters={}, lists={}, conditions={})
    for i, raw in enumerate([{"count_present": ["fever"], "ge": -1}, {"count_present": ["fever"], "ge": 1.5},
                             {"fact": "fever", "is": "maybe"}, {"fact": "age_years", "is": "present"}]):
        C.parse(raw, ctx, f"$.d{i}")
    assert [(p.path, p.message) for p in ctx.problems] == [
        ("$.d0.ge", "expected a whole number >= 0"), ("$.d1.ge", "expected a whole number >= 0"),
        ("$.d2.is", "fever is tri_state: 'is' takes present/absent/unknown/known"),
        ("$.d3.is", "age_years is number: 'is' takes only unknown/known here")]


# ----------------------------------------------------------------------------------- derived facts
def _derived(c: dict[str, Any]) -> dict[str, Any]:
    from cds.facts import PatientFacts
    from cds.rulesets import load_ruleset
    from cds.scores import derive

    return derive(PatientFacts.from_dict(c), load_ruleset("back-hip-pain", "1.0.0").parameters)


@pytest.mark.parametrize(("treatments", "expected"), [
    ([{"step": "self-care", "weeks": 6, "outcome": "improved"}], "absent"),
    ([{"step": "self-care", "weeks": 6, "outcome": "partial"}], "absent"),
    ([{"step": "self-care", "weeks": 2, "outcome": "no-improvement"}], None),   # too short to say
    ([{"step": "self-care", "weeks": "unknown", "outcome": "worse"}], None),
    ([{"step": "self-care", "weeks": 4, "outcome": "worse"}], "present"),
])
def test_no_improvement_after_4_weeks_needs_a_failed_trial_of_4_weeks(treatments: list[Any], expected: Any) -> None:
    c = case(pain_duration_weeks=10)
    c["treatments"] = treatments
    assert _derived(c).get("no_improvement_after_4_weeks") == expected


def test_an_improved_trial_is_not_a_malignancy_weak_flag() -> None:
    """Weight loss + first episode + a 6-week trial that *improved*: one weak flag, no spinal malignancy."""
    c = _weak_case("first_episode")
    c["treatments"] = [{"step": "self-care", "weeks": 6, "outcome": "improved"}]
    assert "sm_combined_weak_flags" not in fired_triggers(evaluate(c))
    c["treatments"] = [{"step": "self-care", "weeks": 2, "outcome": "no-improvement"}]
    assert "sm_combined_weak_flags" not in fired_triggers(evaluate(c))


def test_censored_duration_category_and_start_back_total() -> None:
    c = case()
    c["context"]["pain_duration_weeks"] = {"lt": 10}   # acute or subacute: unknown, never "subacute"
    assert "duration_category" not in _derived(c)
    c["context"]["pain_duration_weeks"] = {"gt": 12}
    assert _derived(c)["duration_category"] == "chronic"
    values = _derived(case())
    assert values["start_back_total"] == 0 and values["start_back_psychosocial_subscore"] == 0
    assert values["start_back_stratum"] == "low"


# ----------------------------------------------------------------------------------- engine capacity model
def test_exactly_fifteen_all_any_nodes_fit_one_engine_rule() -> None:
    """The C core takes 15 all/any nodes in a rule (16: error 113): 15 must not be split, 16 must."""
    from cds.conditions import And, Is, Or
    from cds.engine import Network

    def node(k: int) -> Any:
        return Or(tuple(And((Is(f"a{i}", "present"), Is(f"b{i}", "present"))) for i in range(k - 1)))
    net = Network.compile("c15@1", [("r", node(15))])
    assert net.engine_rule_count == 1 and net.widths == (14,)
    assert net.fired({"a13": "present", "b13": "present"}) == {"r"}
    assert Network.compile("c16@1", [("r", node(16))]).engine_rule_count == 2


def test_width_model_counts_eq_ge_le_true_together_on_one_number() -> None:
    """x = 5 satisfies eq 5, ge 5 and le 5 at once: the width bound must count all three."""
    from cds.conditions import Cmp
    from cds.engine import Network

    net = Network.compile("num@1", [("e", Cmp("x", "eq", 5)), ("g", Cmp("x", "ge", 5)), ("l", Cmp("x", "le", 5))])
    assert net.widths == (3,)
    assert net.fired({"x": 5}) == {"e", "g", "l"} and net.fired({"x": 6}) == {"g"}


@pytest.mark.parametrize("sign", ["collapse_or_syncope", "hypotension_or_shock", "pulsatile_abdominal_mass"])
def test_aaa_with_abdominal_pain_escalates_whatever_the_pain_region(sign: str) -> None:
    """Vocabulary: new back *and/or abdominal* pain with collapse, shock or a pulsatile mass is an emergency."""
    rec = evaluate(case("hip", abdominal_pain=P, **{sign: P}))
    _assert_escalates(rec, "aaa_collapse_shock_or_mass")
    assert rec["urgency"] == "emergency" and rec["status"] == "complete"


def test_narrowest_width_and_the_refusals_name_the_rule() -> None:
    from cds.conditions import And, Is, Or
    from cds.engine import Network
    from cds.errors import RulesetError

    assert Network.compile("w1@1", [("r", Is("a", "present"))], max_width=1).widths == (1,)  # 1 is allowed
    eight = And(tuple(Or((Is(f"a{i}", "present"), Is(f"b{i}", "present"))) for i in range(8)))
    net = Network.compile("w8@1", [("r", eight)], max_width=1)   # 2**8 pieces: exactly the 256 allowed
    assert net.engine_rule_count == 256 and set(net.widths) == {1}
    nine = And(tuple(Or((Is(f"a{i}", "present"), Is(f"b{i}", "present"))) for i in range(9)))
    with pytest.raises(RulesetError, match=r"^rule 'r' cannot be compiled for durable_rules: even split into 256 "):
        Network.compile("w9@1", [("r", nine)], max_width=1)
    with pytest.raises(RulesetError, match=r"^rule 'r': a condition names no fact id$"):
        Network.compile("nofact@1", [("r", Is("", "present"))])
