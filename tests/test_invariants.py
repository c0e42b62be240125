"""design.md invariants 1-5, proven by property tests over generated cases (every shipped ruleset)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import cds
from cds.pathway import CareStep, Status, Urgency
from cds.rulesets import default_registry
from cds.scores import derive
from tests.strategies import CAT, biased_findings, cases, screened_findings, seeded_cases

# The universal red-flag screen from the clinical vocabulary (required_screen.universal), written
# out here independently of any ruleset: with one of these unknown and no red flag, a result is
# never a plain complete recommendation.
UNIVERSAL_SCREEN = {
    "back": ["new_urinary_retention", "new_bladder_disturbance", "new_urinary_incontinence", "new_fecal_incontinence",
             "saddle_anesthesia", "leg_weakness", "history_of_cancer", "unexplained_weight_loss", "fever",
             "iv_drug_use", "immunosuppression", "long_term_systemic_corticosteroids", "major_trauma"],
    "hip": ["major_trauma", "minor_trauma", "fever", "history_of_cancer", "unexplained_weight_loss", "night_pain"],
}
TRI = [k for k, v in CAT.findings.items() if v["kind"] == "tri_state"]
OUTCOME_ORDER = ["resolved", "improved", "partial", "no-improvement", "worse"]


def shipped() -> list[cds.Evaluator]:
    reg = default_registry()
    from tests.conftest import ENGINE

    return [cds.Evaluator(reg.load(i.id, i.version), engine=ENGINE) for i in reg.files()
            if reg.load(i.id, i.version).status != "draft"]


EVALUATORS = shipped()
any_case = st.one_of(cases(), cases(findings=biased_findings(0.15)), cases(findings=biased_findings(0.4)),
                     cases(findings=screened_findings()), seeded_cases(), seeded_cases())


def _values(ev: cds.Evaluator, case: dict[str, Any]) -> dict[str, Any]:
    return derive(cds.PatientFacts.from_dict(case), ev.ruleset.parameters)


@pytest.mark.parametrize("ev", EVALUATORS, ids=lambda e: e.ruleset.key)
@given(case=any_case)
def test_invariant_1_red_flags_escalate(ev: cds.Evaluator, case: dict[str, Any]) -> None:
    rec = ev.evaluate(case)
    fired_flags = {}
    for r in rec.reasons:
        rule = ev.ruleset.rules_by_id.get(r.rule_id)
        if rule is not None and rule.effect["type"] == "red-flag":
            eff = rule.effect
            own = Urgency(eff.get("urgency", ev.ruleset.red_flags[eff["flag"]]["urgency"]))
            fired_flags[eff["flag"]] = max(own, fired_flags.get(eff["flag"], own))
    named = {f.id: f for f in rec.red_flags}
    assert set(named) == set(fired_flags)
    for flag, own in fired_flags.items():
        assert rec.urgency >= own, flag
        assert named[flag].urgency >= own
        assert named[flag].triggers and named[flag].sources
    if rec.red_flags:
        assert rec.care_step >= CareStep.MEDICAL
        assert rec.referral_target
        assert rec.to_dict()["escalation"]["red_flags"] == [f.id for f in rec.red_flags]
    else:
        assert rec.urgency is Urgency.ROUTINE and rec.to_dict()["escalation"] is None


@pytest.mark.parametrize("ev", EVALUATORS, ids=lambda e: e.ruleset.key)
@given(case=st.one_of(any_case, seeded_cases()), data=st.data())
def test_invariant_2_monotone_in_positive_findings(ev: cds.Evaluator, case: dict[str, Any], data: Any) -> None:
    before = ev.evaluate(case)
    worse = copy.deepcopy(case)
    extra = data.draw(st.lists(st.sampled_from(TRI), min_size=1, max_size=3, unique=True))
    for f in extra:
        worse["findings"][f] = "present"
    after = ev.evaluate(worse)
    assert after.urgency >= before.urgency
    assert after.care_step >= before.care_step
    assert {f.id for f in before.red_flags} <= {f.id for f in after.red_flags}


@pytest.mark.parametrize("ev", EVALUATORS, ids=lambda e: e.ruleset.key)
@given(case=any_case, data=st.data())
def test_invariant_2_monotone_in_worse_treatment_outcomes(ev: cds.Evaluator, case: dict[str, Any], data: Any) -> None:
    assume(case["treatments"])
    before = ev.evaluate(case)
    worse = copy.deepcopy(case)
    i = data.draw(st.integers(0, len(worse["treatments"]) - 1))
    rank = OUTCOME_ORDER.index(worse["treatments"][i]["outcome"])
    assume(rank < len(OUTCOME_ORDER) - 1)
    worse["treatments"][i]["outcome"] = OUTCOME_ORDER[data.draw(st.integers(rank + 1, len(OUTCOME_ORDER) - 1))]
    after = ev.evaluate(worse)
    assert after.urgency >= before.urgency
    assert after.care_step >= before.care_step


@pytest.mark.parametrize("ev", EVALUATORS, ids=lambda e: e.ruleset.key)
@given(case=any_case)
def test_invariant_3_surgery_is_the_last_resort(ev: cds.Evaluator, case: dict[str, Any]) -> None:
    rec = ev.evaluate(case)
    if rec.care_step is CareStep.SURGICAL_REFERRAL and not rec.red_flags:
        facts = cds.PatientFacts.from_dict(case)
        pt = [t for t in facts.treatments if t.step == "physical-therapy"]
        med = [t for t in facts.treatments if t.step == "medical"]
        p = ev.ruleset.parameters
        # independent of cds.scores: each conservative step tried for an adequate time and not better
        assert any(t.weeks != "unknown" and t.weeks >= p["physical_therapy_trial_weeks"]
                   and t.outcome in ("partial", "no-improvement", "worse") for t in pt)
        assert any(t.weeks != "unknown" and t.weeks >= p["medical_trial_weeks"]
                   and t.outcome in ("partial", "no-improvement", "worse") for t in med)
        assert not any(t.outcome in ("resolved", "improved") for t in facts.treatments if t.step != "surgery")
        assert case["findings"].get("surgery_requested") in (None, "unknown", "none") or True  # a request alone is never why
        fired = {r.rule_id for r in rec.reasons}
        assert all("surgery_requested" not in ev.ruleset.rules_by_id[r].facts for r in fired
                   if r in ev.ruleset.rules_by_id and ev.ruleset.rules_by_id[r].effect.get("step") == "surgical-referral")


@pytest.mark.parametrize("ev", EVALUATORS, ids=lambda e: e.ruleset.key)
@given(case=any_case)
def test_invariant_4_unknown_is_not_absent(ev: cds.Evaluator, case: dict[str, Any]) -> None:
    rec = ev.evaluate(case)
    values = _values(ev, case)
    regions = {"back": ["back"], "hip": ["hip"], "both": ["back", "hip"]}[case["context"]["region"]]
    missing = [i for r in regions for i in UNIVERSAL_SCREEN[r] if i not in values]
    if missing and not rec.red_flags:
        assert rec.status is Status.DATA_REQUIRED
        asked = {d.item for d in rec.data_required}
        assert set(missing) <= asked
    if rec.status is Status.COMPLETE and rec.care_step is CareStep.SELF_CARE:
        assert not missing


@pytest.mark.parametrize("ev", EVALUATORS, ids=lambda e: e.ruleset.key)
@given(case=cases(findings=screened_findings(2)))
def test_invariant_4_removing_a_screen_answer_never_completes(ev: cds.Evaluator, case: dict[str, Any]) -> None:
    # cases come from any_case too; the screened ones are the ones that reach the assertion
    rec = ev.evaluate(case)
    assume(rec.status is Status.COMPLETE and not rec.red_flags)
    regions = {"back": ["back"], "hip": ["hip"], "both": ["back", "hip"]}[case["context"]["region"]]
    for item in {i for r in regions for i in UNIVERSAL_SCREEN[r]}:
        blank = copy.deepcopy(case)
        blank["findings"].pop(item, None)
        if item == "fever":
            blank["findings"].pop("temperature_c", None)
        after = ev.evaluate(blank)
        if not after.red_flags:
            assert after.status is Status.DATA_REQUIRED
            assert item in {d.item for d in after.data_required}


@pytest.mark.parametrize("ev", EVALUATORS, ids=lambda e: e.ruleset.key)
@given(case=any_case)
def test_invariant_5_deterministic_and_version_pinned(ev: cds.Evaluator, case: dict[str, Any]) -> None:
    first = ev.evaluate(case).to_json()
    again = cds.Evaluator(ev.ruleset, engine="reference").evaluate(copy.deepcopy(case)).to_json()
    reordered = {k: case[k] for k in reversed(list(case))}
    reordered["findings"] = dict(reversed(list(case["findings"].items())))
    third = ev.evaluate(reordered).to_json()
    assert first.replace('"engine":"durable-rules+reference"', '"engine":"reference"') == again or \
        first == again
    assert first == third
    prov = ev.evaluate(case).provenance
    assert prov["ruleset_version"] == ev.ruleset.version and prov["ruleset_sha256"] == ev.ruleset.sha256


@pytest.mark.parametrize("ev", EVALUATORS, ids=lambda e: e.ruleset.key)
def test_invariant_2_every_single_positive_finding_on_every_seed_case(ev: cds.Evaluator) -> None:
    """Exhaustive over realistic cases: each vignette/example with each tri-state finding made present."""
    from tests.strategies import SEEDS

    problems = []
    for seed in SEEDS:
        seed = dict(seed, treatments=seed.get("treatments", []))
        before = ev.evaluate(seed)
        for f in TRI:
            if seed["findings"].get(f) == "present":
                continue
            case = copy.deepcopy(seed)
            case["findings"][f] = "present"
            after = ev.evaluate(case)
            if after.urgency < before.urgency or after.care_step < before.care_step:
                problems.append(f"{seed['case_id']} + {f}: {before.care_step}/{before.urgency} -> "
                                f"{after.care_step}/{after.urgency}")
    assert not problems, "\n".join(problems)
