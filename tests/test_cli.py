"""The `cds evaluate` command: recommendation JSON on stdout; bad input -> what and where, exit 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from cds._resources import load_schema
from cds.cli import main
from tests.conftest import ENGINE

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
REC = jsonschema.Draft202012Validator(load_schema("recommendation.schema.json"))


def run(args, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        import io
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["evaluate", "--engine", ENGINE, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cauda_equina_example_escalates_as_an_emergency(capsys):
    code, out, err = run([str(EXAMPLES / "cauda-equina.json")], capsys)
    assert code == 0, err
    rec = json.loads(out)
    REC.validate(rec)
    assert rec["urgency"] == "emergency" and rec["status"] == "complete"
    flag = rec["red_flags"][0]
    assert flag["id"] == "cauda_equina_syndrome" and flag["referral_target"] == "emergency-department"
    assert {"new_urinary_retention", "saddle_anesthesia"} <= set(flag["findings"])
    reason = next(r for r in rec["reasons"] if r["rule_id"] in flag["triggers"])
    assert reason["sources"] and all(s["citation"] for s in reason["sources"])


def test_low_risk_case_gets_complete_self_care_and_removing_an_item_asks_for_it(capsys):
    code, out, _ = run([str(EXAMPLES / "low-risk-back-pain.json")], capsys)
    rec = json.loads(out)
    assert code == 0 and rec["status"] == "complete" and rec["care_step"] == "self-care" and not rec["red_flags"]
    code, out, _ = run([str(EXAMPLES / "low-risk-saddle-not-asked.json")], capsys)
    rec = json.loads(out)
    assert rec["status"] == "data-required"
    assert [d["item"] for d in rec["data_required"]] == ["saddle_anesthesia"]
    assert rec["care_step"] == "self-care"  # the provisional step is still given


def test_stdin_and_byte_stable_output(capsys, monkeypatch):
    text = (EXAMPLES / "hip-osteoarthritis.json").read_text()
    _, first, _ = run(["-", "--compact"], capsys, stdin=text, monkeypatch=monkeypatch)
    _, second, _ = run(["-", "--compact"], capsys, stdin=text, monkeypatch=monkeypatch)
    assert first == second and first.count("\n") == 1
    assert json.loads(first)["care_step"] == "physical-therapy"


@pytest.mark.parametrize("content,expected", [
    ("{not json", "not valid JSON (line 1"),
    ('{"case_id": "x", "context": {"region": "back"}, "findings": {"saddle_anesthesia": "yes"}}',
     "$.findings.saddle_anesthesia: expected one of present/absent/unknown"),
    ('{"case_id": "x", "context": {"region": "back"}, "findings": {"sadle_anesthesia": "present"}}',
     "$.findings.sadle_anesthesia: unknown finding id"),
    ("[]", "$: expected a JSON object"),
])
def test_bad_input_says_what_and_where_with_exit_2(tmp_path, capsys, content, expected):
    path = tmp_path / "case.json"
    path.write_text(content)
    code, out, err = run([str(path)], capsys)
    assert code == 2 and out == ""
    assert expected in err and "Traceback" not in err


def test_missing_file_and_unknown_ruleset(tmp_path, capsys):
    code, _, err = run([str(tmp_path / "nope.json")], capsys)
    assert code == 2 and "cannot read" in err
    code = main(["evaluate", "--ruleset", "no-such-ruleset", str(EXAMPLES / "cauda-equina.json")])
    _, err = capsys.readouterr()
    assert code == 2 and "no ruleset named 'no-such-ruleset'" in err


def test_console_script_runs_in_a_subprocess():
    proc = subprocess.run([sys.executable, "-m", "cds", "evaluate", "--engine", ENGINE, "--compact",
                           str(EXAMPLES / "adolescent-limp.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout)
    assert rec["red_flags"][0]["id"] == "slipped_capital_femoral_epiphysis" and rec["status"] == "data-required"
