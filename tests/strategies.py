"""Hypothesis strategies shared by every property test: valid cases over the whole vocabulary.

Every finding id, context id, STarT Back item, ODI section and treatment field the facts schema
knows can appear; any of them can be missing (unknown). Values stay inside the contract, so a
generated case always validates.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from cds.facts import CENSOR_OPS, catalogue

CAT = catalogue()

NUMBER_RANGES = {
    "age_years": (0, 105), "pain_duration_weeks": (0, 520), "back_pain_onset_age_years": (0, 100),
    "temperature_c": (34, 42), "systolic_bp_mmhg": (60, 220), "diastolic_bp_mmhg": (30, 130),
    "heart_rate_bpm": (30, 180), "bmi_kg_m2": (12, 60), "weight_loss_kg": (0, 30),
    "morning_stiffness_minutes": (0, 240), "back_pain_severity_nrs": (0, 10), "leg_pain_severity_nrs": (0, 10),
    "walking_tolerance_m": (0, 10000), "off_work_weeks": (0, 104), "esr_mm_h": (0, 140), "crp_mg_l": (0, 300),
    "wbc_10e9_l": (0, 40),
}


def number(fact: str, censored: bool = True) -> st.SearchStrategy[Any]:
    lo, hi = NUMBER_RANGES.get(fact, (0, 100))
    plain = st.one_of(st.integers(lo, hi), st.floats(lo, hi, allow_nan=False, allow_infinity=False).map(
        lambda x: round(x, 1)))
    options = [plain, st.just("unknown")]
    if censored:
        options.append(st.builds(lambda op, b: {op: b}, st.sampled_from(CENSOR_OPS), st.integers(lo, hi)))
    return st.one_of(*options)


def value(fact: str, spec: Any) -> st.SearchStrategy[Any]:
    if spec["kind"] == "number":
        return number(fact)
    return st.sampled_from(spec["values"])


def _maybe(fields: dict[str, st.SearchStrategy[Any]], min_size: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields).filter(lambda d: len(d) >= min_size)


treatment = st.builds(
    lambda step, outcome, weeks, mods: {"step": step, "outcome": outcome, "weeks": weeks,
                                        **({"modalities": mods} if mods else {})},
    st.sampled_from(CAT.steps), st.sampled_from(CAT.outcomes),
    st.one_of(st.integers(0, 60), st.just("unknown")),
    st.lists(st.sampled_from(CAT.modalities), max_size=2, unique=True),
)

start_back = st.one_of(st.none(), st.fixed_dictionaries(
    {}, optional={item: st.sampled_from(answers) for item, answers in CAT.start_back.items()}))
complete_start_back = st.fixed_dictionaries(
    {item: st.sampled_from([a for a in answers if a is not None]) for item, answers in CAT.start_back.items()})


@st.composite
def cases(draw: Any, region: str | None = None, findings: st.SearchStrategy[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A valid case. ``findings`` overrides the findings strategy (e.g. to bias towards present)."""
    context = draw(_maybe({k: value(k, v) for k, v in CAT.context.items() if k != "region"}))
    context["region"] = region or draw(st.sampled_from(("back", "hip", "both")))
    f = draw(findings if findings is not None else _maybe({k: value(k, v) for k, v in CAT.findings.items()}))
    case: dict[str, Any] = {"case_id": draw(st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)),
                            "context": context, "findings": f,
                            "treatments": draw(st.lists(treatment, max_size=4))}
    sb = draw(start_back)
    if sb is not None:
        case["start_back"] = sb
    return case


def biased_findings(p_present: float = 0.3) -> st.SearchStrategy[dict[str, Any]]:
    """Findings where tri-state items are often present: red flags fire often enough to test."""
    tri = [k for k, v in CAT.findings.items() if v["kind"] == "tri_state"]
    others = {k: value(k, v) for k, v in CAT.findings.items() if v["kind"] != "tri_state"}

    @st.composite
    def build(draw: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in tri:
            r = draw(st.integers(0, 99))
            if r < p_present * 100:
                out[k] = "present"
            elif r < 70:
                out[k] = "absent"
            elif r < 80:
                out[k] = "unknown"
        out.update(draw(_maybe(others)))
        return out
    return build()


def screened_findings(max_changes: int = 3) -> st.SearchStrategy[dict[str, Any]]:
    """Every tri-state finding answered absent, then a few changed: mostly complete, non-escalated cases."""
    tri = [k for k, v in CAT.findings.items() if v["kind"] == "tri_state"]

    @st.composite
    def build(draw: Any) -> dict[str, Any]:
        out: dict[str, Any] = dict.fromkeys(tri, "absent")
        for k in draw(st.lists(st.sampled_from(tri), max_size=max_changes, unique=True)):
            out[k] = draw(st.sampled_from(("present", "unknown")))
        out["temperature_c"] = draw(st.sampled_from((36.5, 37.0, 36.8)))
        return out
    return build()


def _seed_cases() -> list[dict[str, Any]]:
    """Realistic starting points: the clinical vignettes and the bundled examples."""
    import json
    from pathlib import Path

    import yaml

    here = Path(__file__).resolve().parent
    out = []
    for v in yaml.safe_load((here / "fixtures" / "vignettes.yaml").read_text(encoding="utf-8"))["vignettes"]:
        case = {"case_id": v["id"], "context": dict(v["context"]), "findings": dict(v.get("facts") or {}),
                "treatments": list(v.get("treatments") or [])}
        if v.get("start_back"):
            case["start_back"] = dict(v["start_back"])
        out.append(case)
    for path in sorted((here.parent / "examples").glob("*.json")):
        out.append(json.loads(path.read_text(encoding="utf-8")))
    return out


SEEDS = _seed_cases()


@st.composite
def seeded_cases(draw: Any) -> dict[str, Any]:
    """A vignette or example, mutated: findings dropped, flipped or added, context nudged."""
    import copy

    case = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    case.setdefault("treatments", [])
    findings = case.setdefault("findings", {})
    for key in draw(st.lists(st.sampled_from(sorted(findings) or ["fever"]), max_size=3, unique=True)):
        findings.pop(key, None)
    for key in draw(st.lists(st.sampled_from(sorted(CAT.findings)), max_size=3, unique=True)):
        findings[key] = draw(value(key, CAT.findings[key]))
    if draw(st.booleans()):
        key = draw(st.sampled_from([k for k in CAT.context if k != "region"]))
        case["context"][key] = draw(value(key, CAT.context[key]))
    if draw(st.integers(0, 9)) == 0:
        case["context"]["region"] = draw(st.sampled_from(("back", "hip", "both")))
    return case
