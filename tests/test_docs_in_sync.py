"""The reviewer documents in docs/rulesets/ are generated from the shipped rulesets and must match.

Regenerate one with ``cds rulesets show ID@VERSION --out docs/rulesets/ID-VERSION.md`` after the
ruleset (or the wording code in cds.governance) changes, and commit it with the change.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from cds import governance
from cds._resources import data_root
from cds.rulesets import Registry

DOCS = Path(__file__).resolve().parent.parent / "docs" / "rulesets"
VERSIONS = [f"{i.id}@{i.version}" for i in Registry(data_root("rulesets")).files()]


def regenerate(ref: str) -> str:
    rid, version = ref.split("@")
    return f"cds rulesets show {ref} --out docs/rulesets/{rid}-{version}.md"


def test_the_shipped_back_hip_pain_document_exists() -> None:
    assert "back-hip-pain@1.0.0" in VERSIONS
    assert (DOCS / "back-hip-pain-1.0.0.md").is_file(), f"missing; create it with: {regenerate('back-hip-pain@1.0.0')}"


@pytest.mark.parametrize("ref", VERSIONS)
def test_reviewer_document_matches_the_ruleset(ref: str) -> None:
    rid, version = ref.split("@")
    doc = DOCS / f"{rid}-{version}.md"
    assert doc.is_file(), f"{doc} is missing; generate it with:\n    {regenerate(ref)}"
    checked_in = doc.read_text(encoding="utf-8")
    current = governance.render_markdown(governance.load_for_review(ref))
    if checked_in != current:
        lines = difflib.unified_diff(checked_in.splitlines(keepends=True), current.splitlines(keepends=True),
                                     f"{doc.name} (checked in)", f"{doc.name} (current)", n=1)
        diff = "".join(list(lines)[:40])
        pytest.fail(f"{doc} is out of date with {ref}; regenerate it with:\n    {regenerate(ref)}\n\n{diff}",
                    pytrace=False)
