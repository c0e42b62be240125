"""The errors cds raises. Each carries a path and a message a person can act on.

No error message ever contains patient data beyond a case id: problems name the JSON path and
what was expected, and quote the offending value only when it is a short token from a closed
vocabulary (never free text or numbers from the case).
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs


class CdsError(Exception):
    """Base class of every error cds raises on purpose."""


@attrs.frozen
class Problem:
    """One thing wrong with an input: where (JSON path) and what was expected."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class FactsError(CdsError, ValueError):
    """A case file does not follow schemas/patient-facts.schema.json. Lists every problem."""

    def __init__(self, problems: Iterable[Problem], case_id: str | None = None) -> None:
        self.problems = tuple(sorted(problems, key=lambda p: (p.path, p.message)))
        self.case_id = case_id
        head = f"case {case_id!r}: " if case_id else ""
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{head}{len(self.problems)} problem(s) in the case facts:\n{lines}")


class RulesetError(CdsError, ValueError):
    """A ruleset is malformed, unknown, tampered with or cannot be compiled."""

    def __init__(self, message: str, *, path: str | None = None, problems: Iterable[Problem] = ()) -> None:
        self.path = path
        self.problems = tuple(problems)
        text = message if not path else f"{path}: {message}"
        if self.problems:
            text += "\n" + "\n".join(f"  {p}" for p in self.problems)
        super().__init__(text)


class EngineError(CdsError, RuntimeError):
    """The rules engine failed, or disagreed with the reference evaluator (fail safe)."""
