"""CDS Hooks feedback (``POST /cds-services/{id}/feedback``) validated and stored in SQLite.

One row per feedback entry. The table keeps what the spec sends (card uuid, outcome, accepted
suggestion ids, override reason coding, the user's comment, the outcome timestamp) plus the service
id, the authenticated client (``iss``, ``tenant``) and when it was received. Note: ``user_comment`` is
free text typed by a clinician and may contain patient data; protect the database file accordingly.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sqlite3
import threading
from collections.abc import Mapping
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at TEXT NOT NULL,
    service_id TEXT NOT NULL,
    card_uuid TEXT NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('accepted', 'overridden')),
    accepted_suggestions TEXT,
    override_system TEXT,
    override_code TEXT,
    override_display TEXT,
    user_comment TEXT,
    outcome_timestamp TEXT NOT NULL,
    client_iss TEXT,
    tenant TEXT
);
CREATE INDEX IF NOT EXISTS feedback_card ON feedback (card_uuid);
"""

_UUID = re.compile(r"^(urn:uuid:)?[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
MAX_TEXT = 4000


class FeedbackError(ValueError):
    """The feedback body does not follow the CDS Hooks feedback format."""


def _text(value: Any, where: str, *, required: bool = False, limit: int = 500) -> str | None:
    if value is None:
        if required:
            raise FeedbackError(f"{where} is required")
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise FeedbackError(f"{where} must be a {'non-empty ' if required else ''}string")
    if len(value) > limit:
        raise FeedbackError(f"{where} is longer than {limit} characters")
    return value


def parse_feedback(body: Any, *, max_items: int) -> list[dict[str, Any]]:
    """Validated rows (without service/client columns); FeedbackError names the first problem."""
    if not isinstance(body, Mapping) or not isinstance(body.get("feedback"), list):
        raise FeedbackError("the body must be an object with a 'feedback' array")
    items = body["feedback"]
    if not items:
        raise FeedbackError("feedback must not be empty")
    if len(items) > max_items:
        raise FeedbackError(f"at most {max_items} feedback entries per request")
    rows = []
    for i, fb in enumerate(items):
        where = f"feedback[{i}]"
        if not isinstance(fb, Mapping):
            raise FeedbackError(f"{where} must be an object")
        card = _text(fb.get("card"), f"{where}.card", required=True, limit=100)
        assert card is not None
        if not _UUID.match(card):
            raise FeedbackError(f"{where}.card must be a card uuid")
        outcome = fb.get("outcome")
        if outcome not in ("accepted", "overridden"):
            raise FeedbackError(f"{where}.outcome must be 'accepted' or 'overridden'")
        ts = _text(fb.get("outcomeTimestamp"), f"{where}.outcomeTimestamp", required=True, limit=40)
        assert ts is not None
        if not _TIMESTAMP.match(ts):
            raise FeedbackError(f"{where}.outcomeTimestamp must be an ISO 8601 / RFC 3339 date-time")
        accepted = fb.get("acceptedSuggestions")
        ids: list[str] = []
        if accepted is not None:
            if not isinstance(accepted, list) or not all(isinstance(a, Mapping) for a in accepted):
                raise FeedbackError(f"{where}.acceptedSuggestions must be an array of objects")
            for j, a in enumerate(accepted):
                sid = _text(a.get("id"), f"{where}.acceptedSuggestions[{j}].id", required=True, limit=100)
                assert sid is not None
                ids.append(sid)
        if outcome == "accepted" and not ids:
            raise FeedbackError(f"{where}.acceptedSuggestions is required for an accepted outcome")
        system = code = display = comment = None
        reason = fb.get("overrideReason")
        if reason is not None:
            if outcome != "overridden":
                raise FeedbackError(f"{where}.overrideReason is only allowed with outcome 'overridden'")
            if not isinstance(reason, Mapping):
                raise FeedbackError(f"{where}.overrideReason must be an object")
            coding = reason.get("reason")
            if coding is not None:
                if not isinstance(coding, Mapping):
                    raise FeedbackError(f"{where}.overrideReason.reason must be a Coding")
                code = _text(coding.get("code"), f"{where}.overrideReason.reason.code", required=True)
                system = _text(coding.get("system"), f"{where}.overrideReason.reason.system", required=True)
                display = _text(coding.get("display"), f"{where}.overrideReason.reason.display")
            comment = _text(reason.get("userComment"), f"{where}.overrideReason.userComment", limit=MAX_TEXT)
            if coding is None and comment is None:
                raise FeedbackError(f"{where}.overrideReason needs a reason or a userComment")
        rows.append({"card_uuid": card.removeprefix("urn:uuid:").lower(), "outcome": outcome,
                     "accepted_suggestions": json.dumps(ids) if ids else None,
                     "override_system": system, "override_code": code, "override_display": display,
                     "user_comment": comment, "outcome_timestamp": ts})
    return rows


class FeedbackStore:
    """SQLite (standard library). One connection per call; safe from several threads."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._memory: sqlite3.Connection | None = None
        if path == ":memory:":
            self._memory = sqlite3.connect(":memory:", check_same_thread=False)
        conn = self._connect()
        try:
            conn.executescript(SCHEMA)
        finally:
            if conn is not self._memory:
                conn.close()

    def _connect(self) -> sqlite3.Connection:
        if self._memory is not None:
            return self._memory
        return sqlite3.connect(self.path, timeout=10)

    def add(self, service_id: str, rows: list[dict[str, Any]], *, client_iss: str | None,
            tenant: str | None) -> int:
        received = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        with self._lock:
            conn = self._connect()
            try:
                with conn:
                    conn.executemany(
                        "INSERT INTO feedback (received_at, service_id, card_uuid, outcome, accepted_suggestions, "
                        "override_system, override_code, override_display, user_comment, outcome_timestamp, "
                        "client_iss, tenant) VALUES (:received_at, :service_id, :card_uuid, :outcome, "
                        ":accepted_suggestions, :override_system, :override_code, :override_display, :user_comment, "
                        ":outcome_timestamp, :client_iss, :tenant)",
                        [{**r, "received_at": received, "service_id": service_id, "client_iss": client_iss,
                          "tenant": tenant} for r in rows])
            finally:
                if conn is not self._memory:
                    conn.close()
        return len(rows)

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            conn = self._connect()
            try:
                conn.row_factory = sqlite3.Row
                return [dict(r) for r in conn.execute("SELECT * FROM feedback ORDER BY id")]
            finally:
                conn.row_factory = None
                if conn is not self._memory:
                    conn.close()
