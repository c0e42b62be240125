"""Ruleset versions and governance (cds.governance, cds.rulesets.Registry).

Every fixture version is derived in tmp_path from the shipped back-hip-pain 1.0.0 file: the
shipped ruleset itself is never edited and no second real version is invented.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from cds import governance
from cds._resources import data_root
from cds.cli import main as cli_main
from cds.errors import RulesetError
from cds.evaluator import Evaluator
from cds.rulesets import Registry

RID = "back-hip-pain"
SHIPPED = data_root("rulesets") / RID / "1.0.0.yaml"


class _NoAliasDumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    def ignore_aliases(self, data: Any) -> bool:
        return True


@pytest.fixture(scope="module")
def shipped() -> dict[str, Any]:
    data = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    assert data["status"] == "active" and data.get("effective_to") is None, \
        "these tests assume the shipped 1.0.0 is active with no effective_to"
    return data


def start(data: dict[str, Any]) -> dt.date:
    return dt.date.fromisoformat(data["effective_from"])


def write_version(root: Path, data: dict[str, Any], version: str, **changes: Any) -> Path:
    """Write a fixture version derived from ``data`` (deep-copied) with top-level changes."""
    d = copy.deepcopy(data)
    d["version"] = version
    d.update(changes)
    path = root / RID / f"{version}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.dump(d, Dumper=_NoAliasDumper, sort_keys=False, allow_unicode=True, width=120),
                    encoding="utf-8")
    return path


def copy_shipped(root: Path) -> Path:
    path = root / RID / "1.0.0.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(SHIPPED.read_bytes())
    return path


def with_param(data: dict[str, Any], name: str, value: float) -> dict[str, Any]:
    d = copy.deepcopy(data)
    d["parameters"][name]["value"] = value
    return d


def with_rules(data: dict[str, Any], *rules: dict[str, Any]) -> dict[str, Any]:
    d = copy.deepcopy(data)
    d["rules"].extend(copy.deepcopy(list(rules)))
    return d


@pytest.fixture(scope="module")
def template_root(tmp_path_factory: pytest.TempPathFactory, shipped: dict[str, Any]) -> Path:
    """0.9.0 retired (the year before 1.0.0), 1.0.0 (the shipped bytes), 1.1.0 draft; 0.9.0 and 1.0.0 released."""
    r = tmp_path_factory.mktemp("template") / "rulesets"
    f = start(shipped)
    write_version(r, shipped, "0.9.0", status="retired", effective_from=(f - dt.timedelta(days=365)).isoformat(),
                  effective_to=f.isoformat())
    copy_shipped(r)
    write_version(r, with_param(shipped, "ng12_age_at_least", 55), "1.1.0", status="draft",
                  effective_from=(f + dt.timedelta(days=100)).isoformat())
    governance.release(r, RID, "0.9.0")
    governance.release(r, RID, "1.0.0")
    return r


@pytest.fixture()
def root(template_root: Path, tmp_path: Path) -> Path:
    """A fresh copy of the template root for each test (tests add, release and tamper with versions)."""
    r = tmp_path / "rulesets"
    shutil.copytree(template_root, r)
    return r


def case(case_id: str = "c1", **findings: Any) -> dict[str, Any]:
    ctx = {"region": findings.pop("region", "back")}
    for k in ("age_years", "pain_duration_weeks"):
        if k in findings:
            ctx[k] = findings.pop(k)
    return {"case_id": case_id, "context": ctx, "findings": findings}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli_main(["rulesets", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ============================================================================ versions side by side
def test_several_versions_load_side_by_side(root: Path) -> None:
    reg = Registry(root)
    v09, v10, v11 = (reg.load(RID, v) for v in ("0.9.0", "1.0.0", "1.1.0"))
    assert [v.version for v in (v09, v10, v11)] == ["0.9.0", "1.0.0", "1.1.0"]
    assert [v.status for v in (v09, v10, v11)] == ["retired", "active", "draft"]
    assert reg.load(RID, "1.0.0") is v10  # compiled once per registry
    assert v10.parameters["ng12_age_at_least"] == 60 and v11.parameters["ng12_age_at_least"] == 55
    c = case(age_years=57, unexplained_weight_loss="present")
    recs = {v.version: Evaluator(v, engine="reference").evaluate(c) for v in (v09, v10, v11)}
    assert {k: r.provenance["ruleset_version"] for k, r in recs.items()} == {k: k for k in recs}
    assert [f.id for f in recs["1.0.0"].red_flags] == []
    assert [f.id for f in recs["1.1.0"].red_flags] == ["spinal_malignancy"]
    # the older evaluator is unaffected by the newer version living beside it
    assert Evaluator(v10, engine="reference").evaluate(c).red_flags == ()


def test_as_of_selects_the_version_in_effect_at_each_boundary(root: Path, shipped: dict[str, Any]) -> None:
    f = start(shipped)
    write_version(root, shipped, "1.2.0", effective_from=(f + dt.timedelta(days=200)).isoformat())
    governance.release(root, RID, "1.2.0")
    reg = Registry(root)

    def on(day: dt.date) -> str:
        return reg.select(RID, as_of=day).version

    first = f - dt.timedelta(days=365)
    assert on(first) == "0.9.0"                                    # effective_from is inclusive
    assert on(f - dt.timedelta(days=1)) == "0.9.0"
    assert on(f) == "1.0.0"                                         # effective_to is exclusive
    assert on(f + dt.timedelta(days=100)) == "1.0.0"               # a draft is never selected by date
    assert on(f + dt.timedelta(days=199)) == "1.0.0"
    assert on(f + dt.timedelta(days=200)) == "1.2.0"
    assert on(f + dt.timedelta(days=5000)) == "1.2.0"
    with pytest.raises(RulesetError, match="no version of back-hip-pain was in effect"):
        on(first - dt.timedelta(days=1))


def test_no_version_means_newest_active_and_drafts_need_an_explicit_version(root: Path, tmp_path: Path,
                                                                               shipped: dict[str, Any]) -> None:
    reg = Registry(root)
    assert reg.select(RID).version == "1.0.0"  # not the newer draft 1.1.0, not the retired 0.9.0
    assert reg.select(RID, "1.1.0").status == "draft"
    only_draft = tmp_path / "drafts"
    write_version(only_draft, shipped, "2.0.0", status="draft")
    with pytest.raises(RulesetError, match="drafts need an explicit version"):
        Registry(only_draft).select(RID)
    assert Registry(only_draft).select(RID, "2.0.0").version == "2.0.0"


def test_unreleased_non_draft_is_marked_and_linted_as_an_error(root: Path, shipped: dict[str, Any],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    write_version(root, shipped, "1.3.0")
    rs = Registry(root).load(RID, "1.3.0")
    assert rs.released is False and Registry(root).load(RID, "1.0.0").released is True
    rec = Evaluator(rs, engine="reference").evaluate(case(age_years=40))
    assert rec.provenance["ruleset_released"] is False
    for target in (f"{RID}@1.3.0", rs, governance.load_for_review(f"{RID}@1.3.0", root)):
        hits = [f for f in governance.lint(target, root=root) if f.check == "release"]
        assert [(f.rule, f.severity) for f in hits] == [("-", "error")]
    assert not [f for f in governance.lint(f"{RID}@1.0.0", root=root) if f.check == "release"]
    assert not [f for f in governance.lint(f"{RID}@1.1.0", root=root) if f.check == "release"]  # a draft
    rc, out, err = run_cli(capsys, "list", "--root", str(root))
    assert rc == 1 and "UNRELEASED" in out and "1.3.0" in err


# =================================================================================== lock / release
def test_release_writes_a_stable_lock(root: Path) -> None:
    lock = root / "lock.json"
    expected = {f"{RID}@0.9.0": hashlib.sha256((root / RID / "0.9.0.yaml").read_bytes()).hexdigest(),
                f"{RID}@1.0.0": hashlib.sha256(SHIPPED.read_bytes()).hexdigest()}
    assert lock.read_text(encoding="utf-8") == json.dumps({"released": expected}, indent=2, sort_keys=True) + "\n"
    assert governance.read_lock(root) == expected


def test_tampering_with_a_released_file_raises_naming_the_file(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = root / RID / "1.0.0.yaml"
    raw = bytearray(path.read_bytes())
    i = raw.index(b"triage")
    raw[i] = ord("T")  # one byte
    path.write_bytes(bytes(raw))
    with pytest.raises(RulesetError) as err:
        Registry(root).load(RID, "1.0.0")
    assert str(path) in str(err.value) and "sha256 locked at release" in str(err.value)
    with pytest.raises(RulesetError, match="1.0.0.yaml"):
        governance.load_for_review(f"{RID}@1.0.0", root)
    findings = governance.lint(f"{RID}@1.0.0", root=root)
    assert any(f.check == "load" and f.severity == "error" and "sha256" in f.what for f in findings)
    rc, out, err_text = run_cli(capsys, "list", "--root", str(root))
    assert rc == 1 and "TAMPERED" in out and "1.0.0" in err_text
    # the other versions are unaffected
    assert Registry(root).load(RID, "0.9.0").version == "0.9.0"


def test_release_refuses_to_re_release(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (root / "lock.json").read_bytes()
    with pytest.raises(RulesetError, match="already released"):
        governance.release(root, RID, "1.0.0")
    rc, _, err = run_cli(capsys, "release", RID, "1.0.0", "--root", str(root))
    assert rc == 2 and "already released" in err and "new version" in err
    assert (root / "lock.json").read_bytes() == before


def test_release_refuses_a_draft_and_a_ruleset_that_does_not_compile(root: Path, shipped: dict[str, Any],
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    before = (root / "lock.json").read_bytes()
    rc, _, err = run_cli(capsys, "release", RID, "1.1.0", "--root", str(root))
    assert rc == 2 and "draft" in err
    broken = copy.deepcopy(shipped)
    broken["rules"][0]["sources"] = ["NO-SUCH-SOURCE"]
    write_version(root, broken, "1.3.0")
    rc, _, err = run_cli(capsys, "release", RID, "1.3.0", "--root", str(root))
    assert rc == 2 and "refusing to release" in err and "NO-SUCH-SOURCE" in err
    assert (root / "lock.json").read_bytes() == before
    rc, out, _ = run_cli(capsys, "release", RID, "9.9.9", "--root", str(root))
    assert rc == 2


def test_release_then_load_and_provenance_carries_the_hash(root: Path, shipped: dict[str, Any],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    write_version(root, shipped, "1.2.0")
    rc, out, _ = run_cli(capsys, "release", RID, "1.2.0", "--root", str(root))
    digest = hashlib.sha256((root / RID / "1.2.0.yaml").read_bytes()).hexdigest()
    assert rc == 0 and digest in out
    assert governance.read_lock(root)[f"{RID}@1.2.0"] == digest
    reg = Registry(root)
    for version in ("1.0.0", "1.2.0"):
        rs = reg.load(RID, version)
        rec = Evaluator(rs, engine="reference").evaluate(case(age_years=40))
        assert rec.provenance["ruleset_sha256"] == rs.sha256 == governance.read_lock(root)[f"{RID}@{version}"]
    assert reg.load(RID, "1.0.0").sha256 == hashlib.sha256(SHIPPED.read_bytes()).hexdigest()


def test_list_shows_every_version(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, "list", "--root", str(root))
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "VERSION", "STATUS", "EFFECTIVE_FROM", "EFFECTIVE_TO", "SHA256", "RULES", "LOCK"]
    rows = {line.split()[1]: line.split() for line in lines[1:]}
    assert rows["0.9.0"][2] == "retired" and rows["0.9.0"][-1] == "released"
    assert rows["1.0.0"][5] == hashlib.sha256(SHIPPED.read_bytes()).hexdigest()[:12]
    assert rows["1.1.0"][2] == "draft" and rows["1.1.0"][-1] == "draft"
    n_rules = len(yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))["rules"])
    assert rows["1.0.0"][6] == str(n_rules)
    rc, out, _ = run_cli(capsys, "list", "--root", str(root), "--json")
    assert [r["version"] for r in json.loads(out)] == ["0.9.0", "1.0.0", "1.1.0"]


# ========================================================================================== show
def test_show_is_deterministic_and_complete(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rs = governance.load_for_review(f"{RID}@1.0.0", root)
    text = governance.render_markdown(rs)
    assert text == governance.render_markdown(governance.load_for_review(SHIPPED))
    assert text.endswith("\n") and not text.endswith("\n\n")
    for heading in ("## Sources", "## Parameters", "## Red-flag categories", "## Red-flag rules (escalation)",
                    "## Care steps (the highest proposal wins)"):
        assert heading in text
    assert text.index("## Red-flag rules") < text.index("## Care steps")
    for rule in rs.rules:
        assert f"### `{rule.id}` — " in text
    for key in rs.sources:
        assert f"**{key}** — " in text
    for name in rs.parameters:
        assert f"| `{name}` | " in text
    # named lists are written out and thresholds name their parameter
    assert "any of these is present (list `ces_core_features`): `new_urinary_retention`" in text
    assert "(parameter `ng12_age_at_least`, years)" in text
    out = tmp_path / "doc" / "x.md"
    rc, _, _ = run_cli(capsys, "show", f"{RID}@1.0.0", "--root", str(root), "--out", str(out))
    assert rc == 0 and out.read_text(encoding="utf-8") == text
    rc, stdout, _ = run_cli(capsys, "show", f"{RID}@1.0.0", "--root", str(root))
    assert rc == 0 and stdout == text
    rc, _, err = run_cli(capsys, "show", RID, "--root", str(root))
    assert rc == 2 and "ID@VERSION" in err


# ========================================================================================== lint
def weak(rule_id: str, when: Any, sources: list[str] | None = None) -> dict[str, Any]:
    return {"id": rule_id, "title": f"planted {rule_id}", "when": when,
            "effect": {"type": "weak-flag", "message": "planted"}, "sources": sources or ["DESIGN"]}


def care(rule_id: str, step: str, when: Any) -> dict[str, Any]:
    return {"id": rule_id, "title": f"planted {rule_id}", "when": when,
            "effect": {"type": "care-step", "step": step, "message": f"planted {step}"}, "sources": ["DESIGN"]}


def findings_for(findings: list[governance.Finding], rule_id: str, check: str | None = None,
                 severity: str | None = None) -> list[governance.Finding]:
    return [f for f in findings if f.rule == rule_id and (check is None or f.check == check)
            and (severity is None or f.severity == severity)]


def test_shipped_ruleset_lints_without_errors() -> None:
    findings = governance.lint(SHIPPED)
    errors = [f for f in findings if f.severity == "error"]
    assert errors == [], "\n".join(f"{f.rule}: {f.what}" for f in errors)
    assert all(set(f.to_dict()) == {"rule", "severity", "check", "what", "why"} for f in findings)
    assert governance.lint(SHIPPED) == findings  # deterministic


UNREACHABLE = {
    "empty_range": {"all": [{"fact": "age_years", "gt": 60}, {"fact": "age_years", "lt": 40}]},
    "contradictory_tri_state": {"all": [{"fact": "fever", "is": "present"}, {"fact": "fever", "is": "absent"}]},
    "count_above_items": {"count_present": ["fever", "chills_or_rigors"], "ge": 3},
    "disjoint_enums": {"all": [{"fact": "region", "in": ["back"]}, {"fact": "region", "in": ["hip"]}]},
    "region_never_unrecorded": {"fact": "region", "is": "unknown"},
    "or_of_impossible_branches": {"any": [
        {"all": [{"fact": "age_years", "ge": 18}, {"fact": "age_years", "lt": 16}]},
        {"all": [{"fact": "fever", "is": "unknown"}, {"fact": "fever", "is": "present"}]}]},
    "not_of_a_tautology": {"not": {"any": [{"fact": "fever", "is": "known"}, {"fact": "fever", "is": "unknown"}]}},
    "above_the_scale": {"fact": "back_pain_severity_nrs", "gt": 10},
    "derived_coupling": {"all": [{"fact": "duration_category", "in": ["acute"]},
                                 {"fact": "pain_duration_weeks", "gt": 20}]},
    "count_of_conditions": {"all": [{"fact": "age_years", "lt": 30},
                                    {"count": [{"fact": "age_years", "gt": 50}, {"fact": "age_years", "gt": 60},
                                               {"fact": "fever", "is": "present"}], "ge": 2}]},
}

REACHABLE = {
    "narrow_range": {"all": [{"fact": "age_years", "gt": 60}, {"fact": "age_years", "lt": 61}]},
    "unknown_listed": {"fact": "hla_b27", "in": ["unknown"]},
    "unrecorded_and_count": {"all": [{"fact": "fever", "is": "unknown"},
                                     {"count_present": ["fever", "chills_or_rigors", "systemically_unwell"],
                                      "ge": 2}]},
    "not_absent": {"not": {"fact": "fever", "is": "absent"}},
}


@pytest.mark.parametrize("name", sorted(UNREACHABLE))
def test_lint_finds_a_planted_unreachable_rule(shipped: dict[str, Any], name: str) -> None:
    findings = governance.lint(with_rules(shipped, weak("planted_" + name, UNREACHABLE[name])))
    hits = findings_for(findings, "planted_" + name, "unsatisfiable", "error")
    assert len(hits) == 1, findings_for(findings, "planted_" + name)


@pytest.mark.parametrize("name", sorted(REACHABLE))
def test_lint_does_not_flag_a_reachable_rule(shipped: dict[str, Any], name: str) -> None:
    findings = governance.lint(with_rules(shipped, weak("planted_" + name, REACHABLE[name])))
    assert findings_for(findings, "planted_" + name, "unsatisfiable") == []
    assert findings_for(findings, "planted_" + name, "undecided") == []


def test_lint_finds_planted_conflicts(shipped: dict[str, Any]) -> None:
    planted = with_rules(
        shipped,
        care("planted_surgery_without_gate", "surgical-referral",
             {"all": [{"ref": "sciatica"}, {"fact": "severe_pain", "is": "present"}]}),
        care("planted_surgery_with_gate", "surgical-referral",
             {"all": [{"ref": "sciatica"}, {"fact": "conservative_care_failed", "is": "present"},
                      {"fact": "severe_pain", "is": "present"}]}),
        care("planted_self_care_for_saddle_anaesthesia", "self-care",
             {"all": [{"ref": "back_region"}, {"fact": "saddle_anesthesia", "is": "present"}]}),
    )
    findings = governance.lint(planted)
    gate = findings_for(findings, "planted_surgery_without_gate", "conflict", "error")
    assert len(gate) == 1 and "conservative_care_failed" in gate[0].what
    assert findings_for(findings, "planted_surgery_with_gate", "conflict", "error") == []
    selfcare = findings_for(findings, "planted_self_care_for_saddle_anaesthesia", "conflict", "error")
    assert len(selfcare) == 1 and "red-flag" in selfcare[0].what
    # different steps that can fire together: a warning on the lower proposal, naming the higher one
    override = [f for f in findings_for(governance.lint(shipped), "cs_back_start_low", "conflict", "warning")
                if "higher proposals" in f.what]
    assert len(override) == 1 and "cs_back_self_care_failed" in override[0].what
    assert governance.lint(shipped) == [f for f in governance.lint(shipped)]
    # the red-flag floor: a red flag cannot set a care step below medical
    flagged = copy.deepcopy(shipped)
    flagged["rules"][0]["effect"]["care_step"] = "self-care"
    first = flagged["rules"][0]["id"]
    assert findings_for(governance.lint(flagged), first, "conflict", "error")


def test_lint_finds_a_planted_missing_citation(shipped: dict[str, Any]) -> None:
    findings = governance.lint(with_rules(shipped, weak("planted_uncited", {"fact": "fever", "is": "present"},
                                                        sources=["NOPE-2020"])))
    hits = findings_for(findings, "planted_uncited", "source", "error")
    assert len(hits) == 1 and "NOPE-2020" in hits[0].what
    d = copy.deepcopy(shipped)
    flag = next(iter(d["red_flags"]))
    d["red_flags"][flag]["sources"] = ["NOPE-2021"]
    hits = [f for f in governance.lint(d) if f.check == "source" and f.severity == "error"]
    assert len(hits) == 1 and hits[0].rule == "-" and f"red_flags.{flag}" in hits[0].what


def test_lint_structure_checks(shipped: dict[str, Any]) -> None:
    d = copy.deepcopy(shipped)
    d["parameters"]["planted_unused"] = {"value": 3, "unit": "weeks", "sources": ["DESIGN"]}
    d["red_flags"]["planted_orphan"] = {"label": "Orphan", "urgency": "urgent", "referral_target": "orthopedics",
                                        "sources": ["DESIGN"]}
    d["sources"]["PLANTED-UNCITED"] = {"citation": "nobody cites this"}
    d["effective_to"] = d["effective_from"]
    whats = {(f.severity, f.check, f.what) for f in governance.lint(d)}
    assert ("warning", "parameter", "parameter planted_unused is declared but no rule, named condition in use or "
            "derived fact reads it") in whats
    assert ("error", "red-flag", "no rule raises red-flag category planted_orphan") in whats
    assert ("warning", "source", "source PLANTED-UNCITED is declared but nothing cites it") in whats
    assert any(s == "error" and c == "metadata" for s, c, _ in whats)
    # derived-fact parameters count as used
    assert not any("no_improvement_trial_weeks" in w for _, _, w in whats)


def test_lint_finds_a_shadowed_rule(shipped: dict[str, Any]) -> None:
    original = next(r for r in shipped["rules"] if r["id"] == "sm_history_of_cancer")
    narrower = copy.deepcopy(original)
    narrower["id"] = "planted_narrower_copy"
    narrower["when"] = {"all": [original["when"], {"fact": "night_pain", "is": "present"}]}
    findings = governance.lint(with_rules(shipped, narrower))
    hits = findings_for(findings, "planted_narrower_copy", "shadowed", "warning")
    assert len(hits) == 1 and "sm_history_of_cancer" in hits[0].what and "identical effect" in hits[0].what
    assert findings_for(findings, "sm_history_of_cancer", "shadowed") == []


def test_lint_schema_and_compile_errors_become_findings(shipped: dict[str, Any]) -> None:
    d = with_rules(shipped, weak("planted_bad_fact", {"fact": "no_such_fact", "is": "present"}))
    hits = findings_for(governance.lint(d), "planted_bad_fact", "compile", "error")
    assert len(hits) == 1 and "no_such_fact" in hits[0].what
    d = copy.deepcopy(shipped)
    del d["rules"][0]["title"]
    hits = [f for f in governance.lint(d) if f.severity == "error"]
    assert hits and hits[0].check == "schema" and hits[0].rule == shipped["rules"][0]["id"]


def test_lint_cli_exit_codes(root: Path, shipped: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, "lint", f"{RID}@1.0.0", "--root", str(root))
    assert rc == 0 and "0 error(s)" in out
    write_version(root, with_rules(shipped, weak("planted_never", UNREACHABLE["empty_range"])), "1.4.0",
                  status="draft")
    rc, out, _ = run_cli(capsys, "lint", f"{RID}@1.4.0", "--root", str(root), "--json")
    report = json.loads(out)
    assert rc == 1 and report["errors"] == 1
    assert {"rule": "planted_never", "severity": "error", "check": "unsatisfiable"}.items() <= \
        next(f for f in report["findings"] if f["rule"] == "planted_never").items()
    rc, out, _ = run_cli(capsys, "lint", "--root", str(root), "--json")
    assert rc == 1 and [r["ruleset"] for r in json.loads(out)] == [f"{RID}@{v}" for v in
                                                                   ("0.9.0", "1.0.0", "1.1.0", "1.4.0")]


# ========================================================================================== diff
def test_diff_reports_what_changed(root: Path, shipped: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    d = with_param(shipped, "malignancy_age_over", 55)
    removed = d["rules"].pop(next(i for i, r in enumerate(d["rules"]) if r["id"] == "wf_night_pain"))
    d["rules"].append(weak("planted_new_rule", {"fact": "fever", "is": "present"}))
    d["sources"]["DESIGN"]["citation"] = "changed"
    flag = next(iter(d["red_flags"]))
    d["red_flags"][flag]["action"] = "changed"
    d["lists"]["ces_core_features"] = d["lists"]["ces_core_features"][:-1]
    write_version(root, d, "1.5.0", status="draft")
    a = governance.load_for_review(f"{RID}@1.0.0", root)
    b = governance.load_for_review(f"{RID}@1.5.0", root)
    diff = governance.diff_rulesets(a, b)
    assert diff["rules"]["added"] == ["planted_new_rule"]
    assert diff["rules"]["removed"] == [removed["id"]]
    assert diff["parameters"] == {"added": [], "removed": [],
                                  "changed": {"malignancy_age_over": {"value": {"from": 50, "to": 55}}}}
    assert diff["sources"]["changed"] == {"DESIGN": ["citation"]}
    assert diff["red_flags"]["changed"] == {flag: ["action"]}
    assert diff["lists"]["changed"] == {"ces_core_features": {"from": shipped["lists"]["ces_core_features"],
                                                              "to": d["lists"]["ces_core_features"]}}
    via = "when (via named condition, list or parameter)"
    users_of_param = {"sm_combined_weak_flags", "wf_age_over_50", "older_new_pain_malignancy_screen"}
    changed = {rid for rid, fields in diff["rules"]["changed"].items() if fields == [via]}
    assert users_of_param | {"ces_core_feature"} <= changed
    assert all(fields == [via] for fields in diff["rules"]["changed"].values())
    assert governance.diff_rulesets(a, a)["rules"] == {"added": [], "removed": [], "changed": {}, "reordered": False}
    rc, out, _ = run_cli(capsys, "diff", f"{RID}@1.0.0", f"{RID}@1.5.0", "--root", str(root))
    assert rc == 0 and "+ planted_new_rule" in out and f"- {removed['id']}" in out and "value: 50 -> 55" in out
    rc, out, _ = run_cli(capsys, "diff", f"{RID}@1.0.0", f"{RID}@1.5.0", "--root", str(root), "--json")
    assert rc == 0 and json.loads(out)["diff"] == json.loads(json.dumps(diff))


def corpus(n: int = 300) -> list[dict[str, Any]]:
    """Ages 45.0 to 74.9 in steps of 0.1 (across 55 and 60), random region and weight loss."""
    rng = random.Random(20261201)  # noqa: S311 - a fixed, reproducible corpus
    cases = []
    for i in range(n):
        weight_loss = rng.choice(["present", "absent", "unknown"])
        cases.append({"case_id": f"c{i:03d}",
                      "context": {"region": rng.choice(["back", "hip", "both"]), "age_years": round(45 + i * 0.1, 1),
                                  "pain_duration_weeks": 2},
                      "findings": {"unexplained_weight_loss": weight_loss, "first_episode_back_pain": "absent",
                                   "night_pain": "absent", "rest_pain": "absent", "history_of_cancer": "absent"}})
    return cases


INVALID = [
    {"case_id": "bad-key", "context": {"region": "back"}, "findings": {"no_such_finding": "present"}},
    {"case_id": "no-region", "context": {"age_years": 50}},
]


def expected_moves(cases: list[dict[str, Any]], old: float, new: float) -> set[str]:
    """Computed from the case data alone: back pain, unexplained weight loss, age in [new, old)."""
    return {c["case_id"] for c in cases if c["context"]["region"] in ("back", "both")
            and c["findings"]["unexplained_weight_loss"] == "present" and new <= c["context"]["age_years"] < old}


def test_impact_reports_exactly_the_cases_a_threshold_change_moves(root: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    cases = corpus()
    moved = expected_moves(cases, 60, 55)
    assert 10 < len(moved) < 100  # the corpus straddles the change
    ndjson = tmp_path / "cases.ndjson"
    ndjson.write_text("".join(json.dumps(c) + "\n" for c in cases + INVALID) + "{not json\n", encoding="utf-8")
    a = governance.load_for_review(f"{RID}@1.0.0", root)
    b = governance.load_for_review(f"{RID}@1.1.0", root)
    report = governance.impact(a, b, ndjson)
    assert report["engine"] == "reference"
    assert (report["cases"], report["evaluated"], report["errors"]) == (303, 300, 3)
    assert [e["case"] for e in report["error_cases"]] == ["cases.ndjson:301", "cases.ndjson:302", "cases.ndjson:303"]
    assert report["changed"]["any"] == report["changed"]["red_flags"] == report["changed"]["urgency"] == len(moved)
    assert report["changed"]["care_step"] == len(moved)
    rows = [t for t in report["transitions"]["red_flags"] if t["changed"]]
    assert [(t["from"], t["to"], t["count"]) for t in rows] == [("none", "spinal_malignancy", len(moved))]
    assert set(rows[0]["examples"]) <= moved and len(rows[0]["examples"]) == 5
    assert [(t["from"], t["to"]) for t in report["transitions"]["urgency"] if t["changed"]] == [("routine", "urgent")]
    assert all(t["to"] == "complete" for t in report["transitions"]["status"] if t["changed"])
    assert sum(t["count"] for t in report["transitions"]["care_step"]) == 300

    folder = tmp_path / "cases"
    folder.mkdir()
    for c in cases + INVALID:
        (folder / f"{c['case_id']}.json").write_text(json.dumps(c), encoding="utf-8")
    (folder / "zz-broken.json").write_text("{", encoding="utf-8")
    rc, out, _ = run_cli(capsys, "diff", f"{RID}@1.0.0", f"{RID}@1.1.0", "--root", str(root), "--cases", str(folder),
                         "--json")
    assert rc == 0
    via_cli = json.loads(out)["impact"]
    assert via_cli["errors"] == 3 and via_cli["changed"] == report["changed"]
    assert via_cli["transitions"] == report["transitions"]
    rc, out, _ = run_cli(capsys, "diff", f"{RID}@1.0.0", f"{RID}@1.1.0", "--root", str(root), "--cases", str(ndjson))
    assert rc == 0 and f"none -> spinal_malignancy: {len(moved)}" in out and "error cases.ndjson:303" in out


def test_impact_accepts_case_dicts(root: Path) -> None:
    a = governance.load_for_review(f"{RID}@1.0.0", root)
    report = governance.impact(a, a, corpus(20) + ["not a case"])
    assert report["changed"]["any"] == 0 and report["evaluated"] == 20 and report["errors"] == 1


def test_condition_wording_covers_every_form(shipped: dict[str, Any], tmp_path: Path) -> None:
    when = {"all": [{"ref": "back_region"},
                    {"not": {"any": [{"fact": "fever", "is": "present"}, {"fact": "age_years", "lt": 18}]}},
                    {"not": {"fact": "night_pain", "is": "absent"}},
                    {"count": [{"fact": "age_years", "gt": {"param": "malignancy_age_over"}},
                               {"fact": "hla_b27", "in": ["negative", "unknown"]}], "ge": 1},
                    {"fact": "start_back_stratum", "is": "known"}]}
    path = write_version(tmp_path, with_rules(shipped, weak("planted_wording", when)), "3.0.0", status="draft")
    text = governance.render_markdown(governance.load_for_review(path))
    block = text[text.index("### `planted_wording`"):]
    block = block[:block.index("**Effect**")]
    assert block.splitlines()[2:] == [
        "**When** all of these are true:",
        "",
        "- `region` is back or both *(named condition `back_region`)*",
        "- none of these is true:",
        "  - `fever` is present",
        "  - `age_years` < 18",
        "- not (`night_pain` is absent)",
        "- at least 1 of these is true:",
        "  - `age_years` > 50 (parameter `malignancy_age_over`, years)",
        "  - `hla_b27` is negative or not recorded",
        "- `start_back_stratum` is recorded",
        "",
    ]
