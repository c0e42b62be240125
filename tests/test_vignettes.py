"""Data-driven check of the back-hip-pain ruleset against the clinical vignettes.

Each vignette in tests/fixtures/vignettes.yaml (a verbatim copy of the clinical team's file) is
turned into a case and evaluated; the recommendation is compared with the vignette's authored
expectations. Expectations are never edited here: a vignette we believe to be clinically wrong
is marked xfail(strict=True) with the reason (KNOWN_DEVIATIONS).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import cds
from cds.scores import start_back_scores
from tests.conftest import ENGINE

RULESET, VERSION = "back-hip-pain", "1.0.0"
VIGNETTES = yaml.safe_load((Path(__file__).parent / "fixtures" / "vignettes.yaml").read_text(encoding="utf-8"))
URGENCY = ["routine", "urgent", "emergency"]

# (vignette id, check) -> reason. The check is xfail(strict=True): it must fail until resolved.
KNOWN_DEVIATIONS: dict[tuple[str, str], str] = {
    ("RF11", "status"): (
        "Vignette expects status complete, but a 66-year-old man with sudden severe back pain also meets "
        "the AAA suspect trigger (clinical.md §1.6, BNSSG: suspect AAA over 50 with sudden back pain) and "
        "BP, pulse and abdominal examination are undocumented; the vignette's own review note "
        "(STATUS_TENSION) says strict evaluation gives data-required. We believe data-required is right."
    ),
}


def case_of(v: dict) -> dict:
    case = {"case_id": v["id"], "context": dict(v["context"]), "findings": dict(v.get("facts") or {}),
            "treatments": list(v.get("treatments") or [])}
    if v.get("start_back") is not None:
        case["start_back"] = dict(v["start_back"])
    if v.get("unknown_reasons"):
        case["unknown_reasons"] = dict(v["unknown_reasons"])
    return case


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    return {v["id"]: cds.evaluate(case_of(v), ruleset=RULESET, version=VERSION, engine=ENGINE).to_dict()
            for v in VIGNETTES["vignettes"]}


# ----------------------------------------------------------------------------- must_not checks
# recommendation:X = X is not recommended: no sentence of the care-step detail/content or of the
# advice mentions it without a negation, and (for the drug / imaging / procedure codes) a caution
# with do_not X is shown. Keyword lists are deliberately broad (tramadol counts as an opioid,
# duloxetine as an SNRI).
MENTIONS = {
    "imaging": r"imaging|x-?ray|\bmri\b|\bct\b|radiograph|scan",
    "mri": r"\bmri\b",
    "bed-rest": r"bed rest|rest in bed|\bbed\b",
    "opioid-acute-lbp-routine": r"opioid|codeine|tramadol|morphine|oxycodone",
    "opioid-chronic-lbp": r"opioid|codeine|tramadol|morphine|oxycodone",
    "opioid-chronic-sciatica": r"opioid|codeine|tramadol|morphine|oxycodone",
    "paracetamol-alone-lbp": r"paracetamol|acetaminophen",
    "ssri-snri-tca-lbp": r"ssri|snri|tricyclic|\btca\b|antidepressant|duloxetine|amitriptyline",
    "anticonvulsant-lbp": r"anticonvulsant|antiepileptic|gabapentin|pregabalin",
    "gabapentinoid-or-antiepileptic-sciatica": r"anticonvulsant|antiepileptic|gabapentin|pregabalin",
    "oral-corticosteroid-sciatica": r"oral (cortico)?steroid|prednisolone",
    "benzodiazepine-sciatica": r"benzodiazepine|diazepam",
    "spinal-injection-lbp": r"spinal injection|facet|injection",
    "epidural-central-stenosis-claudication": r"claudication|stenosis",
    "spinal-fusion": r"fusion",
    "disc-replacement": r"disc replacement",
    "strong-opioid-oa": r"opioid|morphine|oxycodone|fentanyl",
    "paracetamol-or-weak-opioid-routine-oa": r"paracetamol|weak opioid|codeine|co-codamol",
    "scoring-tool-threshold-for-referral": r"oxford hip score|hoos|scoring",
    "exclude-referral-on-age-sex-smoking-comorbidity-bmi": r"exclude",
    "ng59-non-recommended-device-or-modality": r"belt|corset|orthotic|rocker|traction|acupuncture|ultrasound|\btens\b|"
                                               r"\bpens\b|interferential",
    "oa-non-recommended-treatment": r"acupuncture|dry needling|glucosamine|hyaluronan",
    "antibiotics-before-aspiration": r"antibiotic",
}
NEGATION = re.compile(r"\b(do not|don't|does not|not|no|never|avoid|without|nor)\b", re.I)
# watchful-waiting has no drug/procedure to caution against: it is checked as "the case escalates".
NO_CAUTION_NEEDED = {"watchful-waiting"}


def recommended_sentences(rec: dict) -> list[str]:
    texts = [rec.get("care_step_detail") or "", *rec.get("care_step_content", ()), *(a["text"] for a in rec["advice"])]
    return [s for t in texts for s in re.split(r"(?<=[.;!?])\s+", t) if s]


def check_must_not(code: str, rec: dict, v: dict) -> str | None:
    """None if the must_not code is respected, else a message."""
    family, _, value = code.partition(":")
    flags = {f["id"] for f in rec["red_flags"]}
    if family == "care_step":
        # vocabulary must_not_codes: "the result must not be a complete recommendation of that step ...; with
        # any red flag the care step is at least medical". An escalated result recommends the referral, not a
        # care step (its care_step is the interim step, at least medical), so for it the code requires the
        # escalation itself: a red flag named with an urgency above routine or a referral target.
        if rec["red_flags"]:
            if rec["escalation"] is None or not rec["referral_target"]:
                return f"red flag without an escalation (care step {rec['care_step']})"
            if value in ("self-care", "physical-therapy") and rec["care_step"] == value:
                return f"escalated case left at care step {value}"
        elif rec["status"] == "complete" and rec["care_step"] == value:
            return f"complete recommendation of care step {value}"
    elif family == "urgency":
        if rec["urgency"] == value:
            return f"urgency is {value}"
    elif family == "red_flag":
        if (value == "any" and flags) or value in flags:
            return f"red flag {value} raised ({sorted(flags)})"
    elif family == "referral":
        targets = ({f["referral_target"] for f in rec["red_flags"]} | {rec["referral_target"]}) - {None}
        if (value == "any" and targets) or value in targets:
            return f"referral to {value} ({sorted(targets)})"
    elif family == "recommendation":
        if value == "watchful-waiting":
            return None if rec["red_flags"] and rec["urgency"] != "routine" else "no escalation (wait and see)"
        pattern = re.compile(MENTIONS[value], re.I)
        positive = [s for s in recommended_sentences(rec) if pattern.search(s) and not NEGATION.search(s)]
        if positive:
            return f"{value} recommended in: {positive}"
        if value not in NO_CAUTION_NEEDED and not any(value in c["do_not"] for c in rec["cautions"]):
            return f"no caution with do_not {value}"
    elif family == "label":
        if value == "hip-osteoarthritis-clinical":
            oa = [r["rule_id"] for r in rec["reasons"] if "hip_oa" in r["rule_id"]]
            return f"hip OA pathway rules fired: {oa}" if oa else None
        # other label codes (e.g. nonspecific-low-back-pain) have no mechanical check: not checked
        return None
    elif family == "reasoning":
        if value == "treat-unknown-as-negative":
            # unknown screen items must hold the case at data-required (or it escalates)
            return None if rec["status"] == "data-required" or rec["red_flags"] else "complete with unknown items"
        if value == "normal-xray-rules-out":
            normal = (v.get("facts") or {}).get("hip_xray_result") == "normal"
            return None if not normal or rec["red_flags"] else "normal X-ray treated as ruling out fracture"
        if value == "knee-only-assessment":
            hip_exam = {"reduced_or_painful_hip_internal_rotation", "obligatory_external_rotation_on_hip_flexion"}
            asked = {d["item"] for d in rec["data_required"]}
            return None if "slipped_capital_femoral_epiphysis" in flags or hip_exam & asked else "no hip assessment"
    else:  # pragma: no cover
        pytest.fail(f"unknown must_not family in {code}")
    return None


# ----------------------------------------------------------------------------- the checks
def check_status(v: dict, rec: dict) -> None:
    assert rec["status"] == v["expected"]["status"], rec["data_required"]


def check_outcome(v: dict, rec: dict) -> None:
    e = v["expected"]
    problems = []
    if URGENCY.index(rec["urgency"]) < URGENCY.index(e["minimum_urgency"]):
        problems.append(f"urgency {rec['urgency']} < {e['minimum_urgency']}")
    # care step: the complete step, or the provisional step shown beside a data request
    if e.get("care_step") is not None and rec["care_step"] != e["care_step"]:
        problems.append(f"care step {rec['care_step']} != {e['care_step']}")
    flags = {f["id"]: f for f in rec["red_flags"]}
    for fid in e.get("red_flags") or []:
        if fid not in flags:
            problems.append(f"red flag {fid} not named (got {sorted(flags)})")
    if e.get("red_flags") and e.get("escalation_target"):
        ok = {e["escalation_target"], *(e.get("acceptable_targets") or [])}
        if rec["referral_target"] not in ok:
            problems.append(f"referral target {rec['referral_target']} not in {sorted(ok)}")
    cited = {f for fl in [*rec["red_flags"], *rec["weak_flags"]] for f in fl["findings"]}
    for fact in e.get("flag_findings") or []:
        if fact not in cited:
            problems.append(f"finding {fact} not cited by any red or weak flag (cited {sorted(cited)})")
    weak = {w["id"] for w in rec["weak_flags"]}
    for wid in e.get("weak_flags") or []:
        if wid not in weak:
            problems.append(f"weak flag {wid} not recorded (got {sorted(weak)})")
    asked = {d["item"] for d in rec["data_required"]}
    for item in [*(e.get("missing_items") or []), *(e.get("data_required_includes") or [])]:
        if item not in asked:
            problems.append(f"{item} not requested (requested {sorted(asked)})")
    codes = {a["code"] for a in rec["advice"]}
    for action in e.get("actions") or []:
        if action not in codes:
            problems.append(f"action {action} not in advice codes {sorted(c for c in codes if c)}")
    for code in e.get("must_not") or []:
        msg = check_must_not(code, rec, v)
        if msg:
            problems.append(f"must_not {code}: {msg}")
    if e.get("start_back"):
        total, sub, stratum = start_back_scores(v["start_back"])
        got = {"total": total, "psychosocial_subscore": sub, "stratum": stratum}
        if got != e["start_back"]:
            problems.append(f"STarT Back {got} != {e['start_back']}")
        if v["context"]["region"] in ("back", "both"):
            fired = {r["rule_id"] for r in rec["reasons"]}
            if f"cs_back_start_{e['start_back']['stratum']}" not in fired:
                problems.append(f"STarT Back {e['start_back']['stratum']} care-step rule did not fire")
    assert not problems, "\n".join(problems)


CHECKS = {"status": check_status, "outcome": check_outcome}


def _params():
    for v in VIGNETTES["vignettes"]:
        for check in CHECKS:
            marks = []
            reason = KNOWN_DEVIATIONS.get((v["id"], check))
            if reason:
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            yield pytest.param(v, check, id=f"{v['id']}-{check}", marks=marks)


@pytest.mark.parametrize(("vignette", "check"), list(_params()))
def test_vignette(vignette: dict, check: str, results: dict[str, dict]) -> None:
    CHECKS[check](vignette, results[vignette["id"]])


def test_every_vignette_is_used() -> None:
    ids = [v["id"] for v in VIGNETTES["vignettes"]]
    assert len(ids) == len(set(ids)) == 30
