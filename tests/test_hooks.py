"""The CDS Hooks service (cds.hooks): discovery, cards, order-select, feedback, JWT security, FHIR fetch.

Skipped cleanly when the cds[hooks] extra (starlette, PyJWT[crypto], httpx) is not installed.
The service runs with engine="reference" here (CDS_TEST_ENGINE is not used: the durable_rules
network is covered by tests/test_engine.py); the default of the service config stays durable-rules.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import hashlib
import hmac
import http.server
import json
import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

pytest.importorskip("starlette")
jwt = pytest.importorskip("jwt")
httpx = pytest.importorskip("httpx")
pytest.importorskip("cryptography")

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient  # noqa: E402

import cds  # noqa: E402
from cds.fhir import facts_from_resources, iter_patients_ndjson  # noqa: E402
from cds.hooks import IssuerConfig, Settings, SettingsError, create_app  # noqa: E402
from cds.hooks.auth import ReplayCache  # noqa: E402
from cds.hooks.cards import empty_paths, lumbar_imaging_codes  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

HERE = Path(__file__).parent
FIX = HERE / "fixtures" / "cds-hooks"
SPEC = FIX / "spec-examples"
HOOKS = FIX / "hook-examples"
FHIR_FIX = HERE / "fixtures" / "fhir"
REF_DATE = dt.date(2026, 11, 26)
ISS = "https://ehr.example.org"
BASE = "http://testserver"
PV = "back-hip-pain-patient-view"
ES = "back-hip-pain-encounter-start"
OS = "lumbar-imaging-order-select"
HOOK_INSTANCE = "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea"
PREFETCH_KEYS = ("patient", "conditions", "observations", "medications", "procedures", "questionnaireResponses")
CARD_FIELDS = {"uuid", "summary", "detail", "indicator", "source", "suggestions", "selectionBehavior",
               "overrideReasons", "links"}


def spec(name: str) -> Any:
    return json.loads((SPEC / name).read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- keys and tokens

def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Keys:
    def __init__(self) -> None:
        self.ec = ec.generate_private_key(ec.SECP384R1())
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other_ec = ec.generate_private_key(ec.SECP384R1())

    def jwks(self) -> dict[str, Any]:
        e = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec.public_key()))
        r = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa.public_key()))
        return {"keys": [{**e, "kid": "ec-1", "alg": "ES384", "use": "sig"},
                         {**r, "kid": "rsa-1", "alg": "RS384", "use": "sig"}]}


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


def claims(aud: str, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    c = {"iss": ISS, "aud": aud, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4()), "sub": "ehr-client"}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def token(keys: Keys, aud: str, *, alg: str = "ES384", kid: str | None = None, key: Any = None,
          headers: dict[str, Any] | None = None, **over: Any) -> str:
    if key is None:
        key = keys.ec if alg.startswith("ES") else keys.rsa
    if kid is None:
        kid = "ec-1" if alg.startswith("ES") else "rsa-1"
    return jwt.encode(claims(aud, **over), key, algorithm=alg, headers={"kid": kid, "typ": "JWT", **(headers or {})})


def auth(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


# ----------------------------------------------------------------------------- FHIR data

def searchset(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}


TYPE_OF_KEY = {"conditions": "Condition", "observations": "Observation", "medications": "MedicationRequest",
               "procedures": "Procedure", "questionnaireResponses": "QuestionnaireResponse"}


def prefetch_from(resources: list[dict[str, Any]]) -> dict[str, Any]:
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    pf: dict[str, Any] = {"patient": patient}
    for key, rtype in TYPE_OF_KEY.items():
        pf[key] = searchset([r for r in resources if r["resourceType"] == rtype])
    return pf


def synthea_bundles() -> list[Path]:
    return sorted((FHIR_FIX / "synthea-r4-bundles").glob("*.json"))


def bundle_resources(path: Path) -> list[dict[str, Any]]:
    b = json.loads(path.read_text(encoding="utf-8"))
    return [e["resource"] for e in b["entry"]]


def ndjson_patients() -> list[tuple[str, list[dict[str, Any]]]]:
    return list(iter_patients_ndjson(FHIR_FIX / "synthea-bulk-ndjson"))


def condition(cid: str, pid: str, code: str, display: str, onset: str = "2026-11-10") -> dict[str, Any]:
    return {"resourceType": "Condition", "id": cid, "subject": {"reference": f"Patient/{pid}"},
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                           "code": "active"}]},
            "verificationStatus": {"coding": [{"system":
                                               "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                               "code": "confirmed"}]},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}]},
            "onsetDateTime": onset}


def synthetic(pid: str, *conds: tuple[str, ...], birth: str = "1958-03-01") -> list[dict[str, Any]]:
    """A patient with active low back pain (onset 2026-11-10) and the given (code, display[, onset]) problems."""
    out: list[dict[str, Any]] = [{"resourceType": "Patient", "id": pid, "gender": "male", "birthDate": birth}]
    out.append(condition(f"{pid}-lbp", pid, "279039007", "Low back pain"))
    for i, (code, display, *onset) in enumerate(conds):
        out.append(condition(f"{pid}-c{i}", pid, code, display, onset=onset[0] if onset else "2019-05-01"))
    return out


CANCER = ("399490008", "Adenocarcinoma of prostate")
FEVER = ("386661006", "Fever", "2026-11-24")  # current
DIABETES = ("44054006", "Type 2 diabetes mellitus")


def hook_request(hook: str, patient_id: str, prefetch: dict[str, Any] | None, **context: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"hook": hook, "hookInstance": HOOK_INSTANCE,
                            "context": {"userId": "Practitioner/example", "patientId": patient_id, **context}}
    if prefetch is not None:
        body["prefetch"] = prefetch
    return body


def reference_rec(resources: list[dict[str, Any]]) -> Any:
    m = facts_from_resources(resources, reference_date=REF_DATE)
    return m, cds.Evaluator("back-hip-pain", engine="reference").evaluate(m.case)


# ----------------------------------------------------------------------------- app fixtures

def make_settings(tmp_path: Path, keys: Keys, **over: Any) -> Settings:
    jwks_path = tmp_path / "ehr-jwks.json"
    jwks_path.write_text(json.dumps(keys.jwks()), encoding="utf-8")
    base: dict[str, Any] = dict(
        issuers=(IssuerConfig(iss=ISS, jwks_file=str(jwks_path)),), engine="reference",
        feedback_db=str(tmp_path / "feedback.sqlite3"), reference_date=REF_DATE)
    base.update(over)
    return Settings(**base)


@pytest.fixture()
def settings(tmp_path: Path, keys: Keys) -> Settings:
    return make_settings(tmp_path, keys)


@pytest.fixture()
def client(settings: Settings) -> Any:
    with TestClient(create_app(settings)) as c:
        yield c


class Api:
    """Signs a fresh token for each call, for the exact URL called."""

    def __init__(self, client: Any, keys: Keys, base: str = BASE):
        self.client, self.keys, self.base = client, keys, base

    def get(self, path: str, **kw: Any) -> Any:
        return self.client.get(path, headers=auth(token(self.keys, self.base + path)), **kw)

    def post(self, path: str, body: Any, **kw: Any) -> Any:
        return self.client.post(path, json=body, headers=auth(token(self.keys, self.base + path)), **kw)

    def hook(self, service: str, body: Any) -> Any:
        return self.post(f"/cds-services/{service}", body)


@pytest.fixture()
def api(client: Any, keys: Keys) -> Api:
    return Api(client, keys)


# ----------------------------------------------------------------------------- card checks

def no_empty(value: Any, path: str = "$") -> list[str]:
    """Independent of cds.hooks.cards.empty_paths: every null / "" / [] / {} in a JSON value."""
    if value is None or value == "" or value == [] or value == {}:
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in no_empty(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in no_empty(v, f"{path}[{i}]")]
    return []


CONCEPT_MAP = {"info": "routine", "warning": "urgent", "critical": "stat"}


def check_response(payload: Any) -> list[dict[str, Any]]:
    assert isinstance(payload, dict) and set(payload) == {"cards"}
    assert no_empty(payload["cards"]) == [] if payload["cards"] else payload == {"cards": []}
    for card in payload["cards"]:
        check_card(card)
    uuids = [c["uuid"] for c in payload["cards"]]
    assert len(uuids) == len(set(uuids))
    return payload["cards"]


def check_card(card: dict[str, Any]) -> None:
    assert set(card) <= CARD_FIELDS, set(card) - CARD_FIELDS
    assert no_empty(card) == []
    uuid.UUID(card["uuid"])
    assert isinstance(card["summary"], str) and 0 < len(card["summary"]) < 140
    assert card["indicator"] in ("info", "warning", "critical")
    src = card["source"]
    assert set(src) == {"label", "url", "topic"}
    assert src["url"].startswith(("http://", "https://"))
    assert set(src["topic"]) == {"system", "code", "display"}
    assert isinstance(card["detail"], str) and "**" in card["detail"]  # Markdown
    assert "Sources" in card["detail"] or card["source"]["topic"]["code"] == "data-required" \
        or "cds " in card["detail"]
    assert card["overrideReasons"], "every card offers override reasons"
    for r in card["overrideReasons"]:
        assert set(r) == {"code", "system", "display"}  # display REQUIRED for service-provided reasons
    if "suggestions" in card:
        assert card["selectionBehavior"] in ("at-most-one", "any")
        for s in card["suggestions"]:
            assert s["label"] and isinstance(s["label"], str)
            uuid.UUID(s["uuid"])
            for a in s["actions"]:
                assert a["type"] in ("create", "update", "delete") and a["description"]
                if a["type"] == "create":
                    res = a["resource"]
                    assert res["resourceType"] == "ServiceRequest"
                    assert res["priority"] == CONCEPT_MAP[card["indicator"]] or card["indicator"] == "info"
                    assert res["status"] == "draft" and res["subject"]["reference"].startswith("Patient/")
                else:
                    assert re.match(r"^ServiceRequest/\S+$", a["resourceId"])
    else:
        assert "selectionBehavior" not in card
    for link in card.get("links", []):
        assert link["type"] == "absolute" and link["url"].startswith("https://") and link["label"]


def check_cards_match(cards: list[dict[str, Any]], rec: Any) -> None:
    """Cards follow the recommendation: a card per red flag, data-required, care step without red flags."""
    by_topic: dict[str, list[dict[str, Any]]] = {}
    for c in cards:
        by_topic.setdefault(c["source"]["topic"]["code"], []).append(c)
    flags = by_topic.get("red-flag", [])
    assert len(flags) == len(rec.red_flags)
    for card, flag in zip(flags, rec.red_flags, strict=True):
        want = {"emergency": "critical", "urgent": "warning", "routine": "info"}[flag.urgency.value]
        assert card["indicator"] == want
        assert flag.label[:40] in card["summary"] or flag.label[:40] in card["detail"]
        sr = card["suggestions"][0]["actions"][0]["resource"]
        assert sr["priority"] == CONCEPT_MAP[want]
        assert sr["code"]["coding"][0]["code"] == flag.referral_target
        assert card["suggestions"][0]["isRecommended"] is True
    data = by_topic.get("data-required", [])
    assert len(data) == (1 if rec.status.value == "data-required" and rec.data_required else 0)
    for card in data:
        assert card["indicator"] == "warning"
        for d in rec.data_required:
            assert f"`{d.item}`" in card["detail"]
    care = by_topic.get("care-step", [])
    assert len(care) == (0 if rec.red_flags else 1)
    for card in care:
        assert card["indicator"] == "info"
    order = ["red-flag", "data-required", "care-step"]
    topics = [c["source"]["topic"]["code"] for c in cards]
    assert topics == sorted(topics, key=order.index)


# ============================================================================= discovery

def test_discovery_lists_services_with_prefetch_templates(api: Api) -> None:
    r = api.get("/cds-services")
    assert r.status_code == 200
    body = r.json()
    assert no_empty(body) == []
    services = {s["id"]: s for s in body["services"]}
    assert {s["hook"] for s in services.values()} == {"patient-view", "encounter-start", "order-select"}
    example = spec("01-discovery-response.json")["services"][0]
    for s in services.values():
        assert set(example) <= set(s) | {"usageRequirements"}
        assert re.match(r"^[A-Za-z0-9\-]+$", s["id"]) and s["description"] and s["title"]
        templates = s["prefetch"]
        assert set(templates) == set(PREFETCH_KEYS)
        assert templates["patient"] == "Patient/{{context.patientId}}"
        types = {t.split("?")[0].split("/")[0] for t in templates.values()}
        assert types == {"Patient", "Condition", "Observation", "MedicationRequest", "Procedure",
                         "QuestionnaireResponse"}
        for t in templates.values():
            # the token form of the spec's templates (examples 03, 07, 29)
            assert re.findall(r"\{\{([^}]*)\}\}", t) == ["context.patientId"]
    for name in ("03-prefetch-template-hba1c.json", "07-discovery-prefetch-templates.json",
                 "29-prefetch-patientToGreet.json"):
        for t in spec(name)["prefetch"].values():
            assert re.search(r"\{\{[^}]+\}\}", t)


def test_discovery_needs_a_jwt(client: Any) -> None:
    r = client.get("/cds-services")
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_token" and r.json()["error_description"]
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_about_page_has_sources_and_no_patient_data(client: Any) -> None:
    r = client.get("/cds-services/about")
    assert r.status_code == 200 and "NICE NG59" in r.text and "back-hip-pain" in r.text


# ============================================================================= JWT security

@pytest.mark.parametrize("alg", ["ES384", "RS384"])
def test_es384_and_rs384_accepted(client: Any, keys: Keys, alg: str) -> None:
    r = client.get("/cds-services", headers=auth(token(keys, BASE + "/cds-services", alg=alg)))
    assert r.status_code == 200


def _unsigned(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}."


def _hs256(keys: Keys, aud: str) -> str:
    # the classic confusion attack: HMAC keyed with the issuer's public key
    secret = keys.ec.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "ec-1"}).encode())
    body = b64url(json.dumps(claims(aud)).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(sig)}"


AUD = BASE + "/cds-services"
NEGATIVE_TOKENS = {
    "alg none": lambda k: _unsigned({"alg": "none", "typ": "JWT", "kid": "ec-1"}, claims(AUD)),
    "alg none, lower case header value": lambda k: _unsigned({"alg": "None", "kid": "ec-1"}, claims(AUD)),
    "HS256 keyed with the public key": lambda k: _hs256(k, AUD),
    "expired": lambda k: token(k, AUD, exp=int(time.time()) - 120, iat=int(time.time()) - 600),
    "issued in the future": lambda k: token(k, AUD, iat=int(time.time()) + 600, exp=int(time.time()) + 900),
    "lifetime too long": lambda k: token(k, AUD, exp=int(time.time()) + 7 * 86400),
    "wrong aud": lambda k: token(k, "https://other.example.org/cds-services"),
    "aud of another endpoint": lambda k: token(k, BASE + "/cds-services/" + PV),
    "aud with two audiences": lambda k: token(k, [AUD, "https://other.example.org"]),
    "aud with a trailing slash": lambda k: token(k, AUD + "/"),
    "unknown iss": lambda k: token(k, AUD, iss="https://evil.example.org"),
    "bad signature (other key, same kid)": lambda k: token(k, AUD, key=k.other_ec),
    "tampered payload": lambda k: (lambda t: t.split(".")[0] + "." + b64url(json.dumps(
        claims(AUD, sub="someone-else")).encode()) + "." + t.split(".")[2])(token(k, AUD)),
    "oversized token": lambda k: token(k, AUD, padding="x" * 9000),
    "missing jti": lambda k: token(k, AUD, jti=None),
    "missing exp": lambda k: token(k, AUD, exp=None),
    "missing kid": lambda k: jwt.encode(claims(AUD), k.ec, algorithm="ES384"),
    "unknown kid": lambda k: token(k, AUD, kid="no-such-key"),
    "RS384 header naming the EC key": lambda k: token(k, AUD, alg="RS384", kid="ec-1"),
    "ES256 not configured": lambda k: jwt.encode(claims(AUD), ec.generate_private_key(ec.SECP256R1()),
                                                 algorithm="ES256", headers={"kid": "ec-1"}),
    "jku not allow-listed": lambda k: token(k, AUD, headers={"jku": "https://evil.example.org/jwks"}),
    "typ not JWT": lambda k: token(k, AUD, headers={"typ": "JWE"}),
    "garbage": lambda k: "not.a.jwt",
}


@pytest.mark.parametrize("case", sorted(NEGATIVE_TOKENS))
def test_bad_tokens_are_401(client: Any, keys: Keys, case: str) -> None:
    r = client.get("/cds-services", headers=auth(NEGATIVE_TOKENS[case](keys)))
    assert r.status_code == 401, r.text
    body = r.json()
    assert body["error"] == "invalid_token" and body["error_description"]
    assert "Bearer" in r.headers["www-authenticate"]


@pytest.mark.parametrize("header", ["", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token abc"])
def test_missing_or_non_bearer_authorization_is_401(client: Any, header: str) -> None:
    r = client.get("/cds-services", headers={"Authorization": header} if header else {})
    assert r.status_code == 401 and r.json()["error"] == "invalid_token"


def test_replayed_jti_is_401(client: Any, keys: Keys) -> None:
    tok = token(keys, AUD)
    assert client.get("/cds-services", headers=auth(tok)).status_code == 200
    r = client.get("/cds-services", headers=auth(tok))
    assert r.status_code == 401 and "jti" in r.json()["error_description"]


def test_service_calls_and_feedback_need_a_jwt_for_their_own_url(client: Any, keys: Keys) -> None:
    body = hook_request("patient-view", "p1", {})
    assert client.post(f"/cds-services/{PV}", json=body).status_code == 401
    r = client.post(f"/cds-services/{PV}", json=body, headers=auth(token(keys, AUD)))
    assert r.status_code == 401  # a discovery token is not valid for the service URL
    fb = spec("20-feedback-overridden-no-reason.json")
    r = client.post(f"/cds-services/{PV}/feedback", json=fb,
                    headers=auth(token(keys, f"{BASE}/cds-services/{PV}")))
    assert r.status_code == 401


def test_sub_allow_list(tmp_path: Path, keys: Keys) -> None:
    s = make_settings(tmp_path, keys)
    s = s.replace(issuers=(IssuerConfig(iss=ISS, jwks_file=s.issuers[0].jwks_file, sub=("ehr-client",)),))
    with TestClient(create_app(s)) as c:
        assert c.get("/cds-services", headers=auth(token(keys, AUD))).status_code == 200
        assert c.get("/cds-services", headers=auth(token(keys, AUD, sub="intruder"))).status_code == 401


def test_configured_base_url_sets_the_expected_aud(tmp_path: Path, keys: Keys) -> None:
    s = make_settings(tmp_path, keys, base_url="https://cds.example.org/triage")
    with TestClient(create_app(s)) as c:
        ok = token(keys, "https://cds.example.org/triage/cds-services")
        assert c.get("/cds-services", headers=auth(ok)).status_code == 200
        assert c.get("/cds-services", headers=auth(token(keys, AUD))).status_code == 401


def test_spec_example_jwt_with_allow_listed_jku(tmp_path: Path) -> None:
    """Header (22), payload (23) and keys (24, 25) of the specification, signed now for our URL."""
    header, payload = spec("22-jwt-header.json"), spec("23-jwt-payload.json")
    private = jwt.PyJWK(spec("25-jwk-private-EXAMPLE-ONLY.json"), algorithm="ES384").key
    s = Settings(issuers=(IssuerConfig(iss=payload["iss"], jku=(header["jku"],)),), engine="reference",
                 feedback_db=str(tmp_path / "fb.sqlite3"), base_url="https://cds.example.org")
    app = create_app(s)
    fetched: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        fetched.append(str(request.url))
        return httpx.Response(200, json=spec("24-jwks-public.json"))

    app.state.cds.auth.jwks._client_factory = lambda: httpx.AsyncClient(transport=httpx.MockTransport(handler))
    now = int(time.time())
    fresh = dict(payload, aud="https://cds.example.org/cds-services", iat=now, exp=now + 60, jti=str(uuid.uuid4()))
    tok = jwt.encode(fresh, private, algorithm="ES384", headers={k: v for k, v in header.items() if k != "alg"})
    with TestClient(app) as c:
        assert c.get("/cds-services", headers=auth(tok)).status_code == 200
        assert fetched == [header["jku"]]
        # the literal token of the specification: expired in 2015 and for another audience
        literal = ("eyJhbGciOiJFUzM4NCIsInR5cCI6IkpXVCIsImtpZCI6ImV4YW1wbGUta2lkIiwiamt1IjoiaHR0cHM6Ly9maGlyLWVoci5l"
                   "eGFtcGxlLmNvbS9qd2tfdXJpIn0.eyJpc3MiOiJodHRwczovL2ZoaXItZWhyLmV4YW1wbGUuY29tLyIsImF1ZCI6Imh0dHBz"
                   "Oi8vY2RzLmV4YW1wbGUub3JnL2Nkcy1zZXJ2aWNlcy9zb21lLXNlcnZpY2UiLCJleHAiOjE0MjI1Njg4NjAsImlhdCI6MTMx"
                   "MTI4MDk3MCwianRpIjoiZWUyMmIwMjEtZTFiNy00NjExLWJhNWItOGVlYzZhMzNhYzFlIiwidGVuYW50IjoiMmRkZDZjM2Et"
                   "OGU5YS00NGM2LWEzMDUtNTIxMTFhZDMwMmEyIn0.d1WfLjGRKlcWB94l9do4cM8REXeYJLL6SGUBO8VHZhfM8mwKYP70EMxJ"
                   "67War4TQblEpaQrp11wx5p7oPFm2ETYgCicS84vXWEIYTdjooZdooCSDf2L8-i4awdoUwiEb")
        r = c.get("/cds-services", headers=auth(literal))
        assert r.status_code == 401 and r.json()["error"] == "invalid_token"


def test_sandbox_jwks_is_a_usable_issuer_key_set() -> None:
    from cds.hooks.auth import _select_key

    jwks = json.loads((FIX / "sandbox-jwks-public.json").read_text(encoding="utf-8"))
    kid = jwks["keys"][0]["kid"]
    assert _select_key(jwks, kid, "ES384") is not None
    assert _select_key(jwks, kid, "RS384") is None  # key type must fit the algorithm
    assert _select_key(jwks, "other", "ES384") is None


def test_private_jwks_entries_are_never_used() -> None:
    from cds.hooks.auth import _select_key

    private = spec("25-jwk-private-EXAMPLE-ONLY.json")
    assert _select_key({"keys": [private]}, private["kid"], "ES384") is None


def test_replay_cache_is_bounded() -> None:
    now = [1000.0]
    cache = ReplayCache(3, clock=lambda: now[0])
    assert cache.check_and_add(("i", "a"), 2000) and not cache.check_and_add(("i", "a"), 2000)
    for j in "bcdef":
        assert cache.check_and_add(("i", j), 2000)
    assert len(cache) == 3
    now[0] = 3000.0  # all expired: an old jti may come back only after its token expired
    assert cache.check_and_add(("i", "f"), 4000)


@pytest.mark.parametrize("bad", [
    {"algorithms": ["HS256"]}, {"algorithms": ["none"]}, {"algorithms": []}, {"engine": "other"},
    {"issuers": []}, {"leeway_seconds": 10_000}, {"required_prefetch": ["observations"]},
    {"issuers": [{"iss": ISS}]}, {"issuers": [{"iss": ISS, "jku": ["http://insecure.example.org/jwks"]}]},
    {"unknown_setting": 1},
])
def test_invalid_settings_are_refused(bad: dict[str, Any]) -> None:
    data = {"issuers": [{"iss": ISS, "jwks_file": "x.json"}], **bad}
    with pytest.raises(SettingsError):
        Settings.from_mapping(data)


def test_settings_from_toml_and_json(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(
        'engine = "reference"\nfeedback_db = "fb.sqlite3"\nreference_date = "2026-01-02"\n'
        '[[issuers]]\niss = "https://ehr.example.org"\njwks_file = "k.json"\n', encoding="utf-8")
    s = Settings.from_file(tmp_path / "c.toml")
    assert s.engine == "reference" and s.reference_date == dt.date(2026, 1, 2)
    assert s.issuers[0].jwks_file == str(tmp_path / "k.json") and s.feedback_db == str(tmp_path / "fb.sqlite3")
    (tmp_path / "c.json").write_text(json.dumps({"insecure_dev_no_auth": True}), encoding="utf-8")
    assert Settings.from_file(tmp_path / "c.json").insecure_dev_no_auth
    assert Settings(insecure_dev_no_auth=True).engine == "durable-rules"  # the service default


# ============================================================================= patient-view from Synthea

@pytest.mark.parametrize("path", synthea_bundles(), ids=lambda p: p.name.split("_")[0])
@pytest.mark.parametrize("service,hook", [(PV, "patient-view"), (ES, "encounter-start")])
def test_synthea_bundles_give_spec_valid_cards(api: Api, path: Path, service: str, hook: str) -> None:
    resources = bundle_resources(path)
    pid = next(r["id"] for r in resources if r["resourceType"] == "Patient")
    extra = {"encounterId": "456"} if hook == "encounter-start" else {}
    r = api.hook(service, hook_request(hook, pid, prefetch_from(resources), **extra))
    assert r.status_code == 200, r.text
    cards = check_response(r.json())
    mapping, rec = reference_rec(resources)
    if not mapping.provenance.get("context.region"):
        assert r.json() == spec("10-response-empty-cards.json")  # nothing applies: no back/hip problem
    else:
        assert cards
        check_cards_match(cards, rec)


@pytest.mark.parametrize("pid,resources", ndjson_patients(), ids=lambda x: x[:8] if isinstance(x, str) else "")
def test_chronic_low_back_pain_patients(api: Api, pid: str, resources: list[dict[str, Any]]) -> None:
    r = api.hook(PV, hook_request("patient-view", pid, prefetch_from(resources)))
    assert r.status_code == 200
    cards = check_response(r.json())
    _, rec = reference_rec(resources)
    check_cards_match(cards, rec)
    summaries = " | ".join(c["summary"] for c in cards)
    assert "Low back pain" in summaries and "Red-flag screen incomplete" in summaries


def test_urgent_red_flag_card_with_referral_suggestion(api: Api) -> None:
    resources = synthetic("rf1", CANCER)
    r = api.hook(PV, hook_request("patient-view", "rf1", prefetch_from(resources), encounterId="e9"))
    cards = check_response(r.json())
    _, rec = reference_rec(resources)
    assert rec.red_flags and rec.urgency.value == "urgent"
    check_cards_match(cards, rec)
    card = cards[0]
    assert card["indicator"] == "warning" and card["source"]["topic"]["code"] == "red-flag"
    sr = card["suggestions"][0]["actions"][0]["resource"]
    assert sr["priority"] == "urgent" and sr["subject"] == {"reference": "Patient/rf1"}
    assert sr["encounter"] == {"reference": "Encounter/e9"}
    assert sr["reasonCode"][0]["coding"][0]["code"] == rec.red_flags[0].id
    assert "NICE" in card["detail"] and "**Why**" in card["detail"]
    assert all(c["source"]["topic"]["code"] != "care-step" for c in cards)  # no routine step beside a red flag


def test_emergency_red_flag_card_is_critical(api: Api) -> None:
    resources = synthetic("rf2", FEVER, DIABETES)
    cards = check_response(api.hook(PV, hook_request("patient-view", "rf2", prefetch_from(resources))).json())
    _, rec = reference_rec(resources)
    assert rec.urgency.value == "emergency"
    check_cards_match(cards, rec)
    assert cards[0]["indicator"] == "critical"
    assert cards[0]["suggestions"][0]["actions"][0]["resource"]["priority"] == "stat"


def test_cards_are_deterministic(api: Api) -> None:
    resources = synthetic("rf1", CANCER)
    body = hook_request("patient-view", "rf1", prefetch_from(resources))
    first, second = api.hook(PV, body).json(), api.hook(PV, body).json()
    assert first == second
    other = copy.deepcopy(body)
    other["hookInstance"] = str(uuid.uuid4())
    assert api.hook(PV, other).json()["cards"][0]["uuid"] != first["cards"][0]["uuid"]


def test_prefetch_null_means_no_data(api: Api) -> None:
    resources = synthetic("p7")
    pf = prefetch_from(resources)
    for k in ("observations", "medications", "procedures", "questionnaireResponses"):
        pf[k] = None
    assert check_response(api.hook(PV, hook_request("patient-view", "p7", pf)).json())


def test_no_back_or_hip_problem_means_no_card(api: Api) -> None:
    resources = [{"resourceType": "Patient", "id": "p8", "gender": "female", "birthDate": "1980-01-01"},
                 condition("p8-c", "p8", "44054006", "Type 2 diabetes mellitus")]
    r = api.hook(PV, hook_request("patient-view", "p8", prefetch_from(resources)))
    assert r.status_code == 200 and r.json() == spec("10-response-empty-cards.json")


# ============================================================================= spec examples replayed

def test_spec_02_request_without_our_prefetch_and_http_fhir_server_is_412(api: Api) -> None:
    body = spec("02-service-request-patient-view.json")
    r = api.hook(PV, body)
    assert r.status_code == 412 and r.json()["error"] == "precondition_failed"


def test_spec_08_partial_prefetch_is_412(api: Api) -> None:
    body = {"hook": "patient-view", "hookInstance": HOOK_INSTANCE, **spec("04-context-patientId.json"),
            **spec("08-request-prefetch-data.json")}
    r = api.hook(PV, body)
    assert r.status_code == 412 and "conditions" in r.json()["error_description"]


def test_412_when_no_prefetch_and_no_fhir_server(api: Api) -> None:
    body = {"hook": "patient-view", "hookInstance": HOOK_INSTANCE, **spec("28-hook-context-patient-view.json")}
    r = api.hook(PV, body)
    assert r.status_code == 412
    assert set(r.json()) == {"error", "error_description"}


def test_prefetch_operation_outcome_counts_as_missing(api: Api) -> None:
    pf = prefetch_from(synthetic("p9"))
    pf["observations"] = {"resourceType": "OperationOutcome",
                          "issue": [{"severity": "error", "code": "timeout"}]}
    assert api.hook(PV, hook_request("patient-view", "p9", pf)).status_code == 412


def test_spec_26_request_without_patient_is_400(api: Api) -> None:
    r = api.hook(PV, spec("26-request-with-extension.json"))
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


@pytest.mark.parametrize("name", ["05-context-draftOrders-no-token.json",
                                  "06-context-draftOrders-with-medicationRequestId.json"])
def test_spec_draft_orders_without_imaging_give_no_card(api: Api, name: str) -> None:
    ctx = spec(name)["context"]
    body = {"hook": "order-select", "hookInstance": HOOK_INSTANCE,
            "context": {"userId": "Practitioner/example", "patientId": "1288992", **ctx}}
    r = api.hook(OS, body)  # no prefetch needed when no lumbar imaging is ordered
    assert r.status_code == 200 and r.json() == spec("10-response-empty-cards.json")


@pytest.mark.parametrize("name", ["patient-view-01.json", "patient-view-02.json", "encounter-start-01.json"])
def test_hook_examples_replayed_with_synthea_prefetch(api: Api, name: str) -> None:
    pid, resources = ndjson_patients()[0]
    ctx = json.loads((HOOKS / name).read_text(encoding="utf-8"))["context"]
    hook = name.rsplit("-", 1)[0]
    body = {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": {**ctx, "patientId": pid},
            "prefetch": prefetch_from(resources)}
    r = api.hook(PV if hook == "patient-view" else ES, body)
    assert r.status_code == 200
    cards = check_response(r.json())
    if "encounterId" in ctx:
        assert all("encounterId" not in c["detail"] for c in cards)
    _, rec = reference_rec(resources)
    check_cards_match(cards, rec)


@pytest.mark.parametrize("name", ["order-select-01.json", "order-select-02.json", "order-select-03.json"])
def test_hook_examples_order_select_without_imaging(api: Api, name: str) -> None:
    body = {"hook": "order-select", "hookInstance": HOOK_INSTANCE,
            **json.loads((HOOKS / name).read_text(encoding="utf-8"))}
    r = api.hook(OS, body)
    assert r.status_code == 200 and r.json() == {"cards": []}


def test_our_cards_have_the_shape_of_the_spec_examples(api: Api) -> None:
    resources = synthetic("rf1", CANCER)
    card = check_response(api.hook(PV, hook_request("patient-view", "rf1", prefetch_from(resources))).json())[0]
    ex_source = spec("11-card-source.json")["source"]
    assert set(card["source"]) <= set(ex_source) and set(card["source"]["topic"]) == set(ex_source["topic"])
    for ours in card["overrideReasons"]:
        assert set(ours) == set(spec("15-card-overrideReasons.json")["overrideReasons"][0])
    ex_cards = spec("17-response-cards-links-overrideReasons.json")["cards"]
    assert {k for c in ex_cards for k in c} <= CARD_FIELDS
    assert set(card["links"][0]) <= set(ex_cards[0]["links"][0])
    create = card["suggestions"][0]["actions"][0]
    assert set(spec("12-action-create.json")) == set(create)
    assert set(spec("13-action-update.json")) == {"type", "description", "resource"}


# ============================================================================= order-select

def imaging_order(oid: str, system: str, code: str, display: str) -> dict[str, Any]:
    return {"resourceType": "ServiceRequest", "id": oid, "status": "draft", "intent": "order",
            "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"system": system, "code": code, "display": display}]}}


LUMBAR = [("http://loinc.org", "30679-5", "MR Lumbar spine WO contrast"),
          ("http://www.ama-assn.org/go/cpt", "72100", "X-ray lumbosacral spine, 2 or 3 views"),
          ("http://snomed.info/sct", "572091000119106", "CT of lumbar spine without contrast")]


@pytest.mark.parametrize("system,code,display", LUMBAR)
def test_lumbar_imaging_for_low_back_pain_without_red_flags_warns(api: Api, system: str, code: str,
                                                                   display: str) -> None:
    pf = prefetch_from(synthetic("p1"))
    orders = searchset([imaging_order("o1", system, code, display),
                        {"resourceType": "MedicationRequest", "id": "m1", "status": "draft", "intent": "order",
                         "subject": {"reference": "Patient/p1"}}])
    body = hook_request("order-select", "p1", pf, selections=["ServiceRequest/o1", "MedicationRequest/m1"],
                        draftOrders=orders)
    cards = check_response(api.hook(OS, body).json())
    assert len(cards) == 1
    card = cards[0]
    assert card["indicator"] == "warning" and card["source"]["topic"]["code"] == "imaging"
    assert "not indicated" in card["summary"]
    assert "ACR" in card["detail"] and "ACP" in card["detail"]
    action = card["suggestions"][0]["actions"][0]
    assert action == {"type": "delete", "description": action["description"], "resourceId": "ServiceRequest/o1"}
    assert {r["code"] for r in card["overrideReasons"]} >= {"red-flag-on-assessment"}
    assert "red-flag screen is incomplete" in card["detail"]  # synthetic patient: screen not answered


def test_imaging_code_list_is_small_and_well_formed() -> None:
    table = lumbar_imaging_codes()
    assert 20 <= len(table) <= 60
    assert {s for s, _ in table} == {"http://loinc.org", "http://snomed.info/sct", "http://www.ama-assn.org/go/cpt"}
    assert all("umbar" in d or "umbosacral" in d for d in table.values())


@pytest.mark.parametrize("variant", ["not selected", "red flag", "hip only", "not lumbar"])
def test_imaging_order_without_warning(api: Api, variant: str) -> None:
    conds = (CANCER,) if variant == "red flag" else ()
    resources = synthetic("p1", *conds)
    if variant == "hip only":
        resources[1] = condition("p1-hip", "p1", "49218002", "Hip pain")
    order = imaging_order("o1", *LUMBAR[0])
    if variant == "not lumbar":
        order = imaging_order("o1", "http://loinc.org", "24968-0x", "MR something else")
    selections = ["ServiceRequest/other"] if variant == "not selected" else ["ServiceRequest/o1"]
    body = hook_request("order-select", "p1", prefetch_from(resources), selections=selections,
                        draftOrders=searchset([order]))
    r = api.hook(OS, body)
    assert r.status_code == 200 and r.json() == {"cards": []}


def test_order_select_needs_patient_data_when_imaging_is_ordered(api: Api) -> None:
    body = hook_request("order-select", "p1", None, selections=["ServiceRequest/o1"],
                        draftOrders=searchset([imaging_order("o1", *LUMBAR[0])]))
    assert api.hook(OS, body).status_code == 412


# ============================================================================= request validation

@pytest.mark.parametrize("mutate,status", [
    (lambda b: b.update(hook="order-sign"), 400),
    (lambda b: b.pop("hookInstance"), 400),
    (lambda b: b["context"].pop("patientId"), 400),
    (lambda b: b["context"].update(patientId="p1&_include=*"), 400),  # no query injection into FHIR URLs
    (lambda b: b.update(prefetch=[]), 400),
    (lambda b: b.update(fhirAuthorization={"access_token": "x", "token_type": "Bearer"}), 200),
    (lambda b: b["prefetch"].update(patient={"resourceType": "Patient", "id": "someone-else"}), 400),
])
def test_request_validation(api: Api, mutate: Any, status: int) -> None:
    body = hook_request("patient-view", "p1", prefetch_from(synthetic("p1")))
    mutate(body)
    r = api.hook(PV, body)
    assert r.status_code == status, r.text
    if status != 200:
        assert set(r.json()) == {"error", "error_description"}


def test_fhir_authorization_without_fhir_server_is_400_when_needed(api: Api) -> None:
    body = hook_request("patient-view", "p1", {})
    body["fhirAuthorization"] = spec("09-fhirAuthorization.json")["fhirAuthorization"]
    assert api.hook(PV, body).status_code == 400


def test_unknown_service_is_404(api: Api) -> None:
    r = api.hook("no-such-service", hook_request("patient-view", "p1", {}))
    assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_body_too_large_is_413(tmp_path: Path, keys: Keys) -> None:
    s = make_settings(tmp_path, keys, max_body_bytes=1000)
    with TestClient(create_app(s)) as c:
        body = hook_request("patient-view", "p1", prefetch_from(synthetic("p1")))
        data = json.dumps(body).encode()
        assert len(data) > 1000
        r = c.post(f"/cds-services/{PV}", content=data, headers={
            **auth(token(keys, f"{BASE}/cds-services/{PV}")), "Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"] == "payload_too_large"

        def chunks() -> Any:  # no Content-Length: the limit holds while streaming
            for i in range(0, len(data), 500):
                yield data[i:i + 500]

        r = c.post(f"/cds-services/{PV}", content=chunks(), headers={
            **auth(token(keys, f"{BASE}/cds-services/{PV}")), "Content-Type": "application/json"})
        assert r.status_code == 413


@pytest.mark.parametrize("content", [b"{not json", b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe"])
def test_invalid_json_is_400(api: Api, keys: Keys, content: bytes) -> None:
    r = api.client.post(f"/cds-services/{PV}", content=content,
                        headers={**auth(token(keys, f"{BASE}/cds-services/{PV}")), "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


# ============================================================================= feedback

@pytest.mark.parametrize("name", ["19-feedback-accepted.json", "20-feedback-overridden-no-reason.json",
                                  "21-feedback-overridden-with-reason.json"])
def test_spec_feedback_is_persisted(api: Api, settings: Settings, name: str) -> None:
    fb = spec(name)
    r = api.post(f"/cds-services/{PV}/feedback", fb)
    assert r.status_code == 200 and r.json() == {"stored": 1}
    with sqlite3.connect(settings.feedback_db) as conn:
        conn.row_factory = sqlite3.Row
        rows = [dict(x) for x in conn.execute("SELECT * FROM feedback")]
    assert len(rows) == 1
    row, entry = rows[0], fb["feedback"][0]
    assert row["card_uuid"] == entry["card"] and row["outcome"] == entry["outcome"]
    assert row["service_id"] == PV and row["client_iss"] == ISS
    assert row["outcome_timestamp"] == entry["outcomeTimestamp"]
    if "acceptedSuggestions" in entry:
        assert json.loads(row["accepted_suggestions"]) == [s["id"] for s in entry["acceptedSuggestions"]]
    if "overrideReason" in entry:
        assert row["override_code"] == entry["overrideReason"]["reason"]["code"]
        assert row["user_comment"] == entry["overrideReason"]["userComment"]


@pytest.mark.parametrize("bad", [
    {}, {"feedback": []},
    {"feedback": [{"card": "x", "outcome": "accepted", "outcomeTimestamp": "2020-01-01T00:00:00Z"}]},
    {"feedback": [{"card": str(uuid.uuid4()), "outcome": "ignored", "outcomeTimestamp": "2020-01-01T00:00:00Z"}]},
    {"feedback": [{"card": str(uuid.uuid4()), "outcome": "accepted", "outcomeTimestamp": "2020-01-01T00:00:00Z"}]},
    {"feedback": [{"card": str(uuid.uuid4()), "outcome": "overridden", "outcomeTimestamp": "yesterday"}]},
])
def test_invalid_feedback_is_400(api: Api, bad: dict[str, Any]) -> None:
    r = api.post(f"/cds-services/{PV}/feedback", bad)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


def test_feedback_for_unknown_service_is_404(api: Api) -> None:
    assert api.post("/cds-services/nope/feedback", spec("20-feedback-overridden-no-reason.json")).status_code == 404


# ============================================================================= logs

def test_logs_carry_no_patient_data_or_tokens(api: Api, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    pid, resources = ndjson_patients()[0]
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    body = hook_request("patient-view", pid, prefetch_from(resources))
    tok = token(api.keys, f"{BASE}/cds-services/{PV}")
    assert api.client.post(f"/cds-services/{PV}", json=body, headers=auth(tok)).status_code == 200
    api.client.post(f"/cds-services/{PV}", json=body, headers=auth(tok))  # replay -> 401, logged
    text = caplog.text
    assert "hookInstance" in text  # something was logged
    for secret in (pid, patient["birthDate"], tok, tok.split(".")[1]):
        assert secret not in text
    assert not re.search(r"Condition/|saddle|\"resourceType\"", text)


# ============================================================================= FHIR server fetch

class FhirStub:
    """A tiny FHIR server on loopback: read Patient, search by patient, paged Conditions, bearer token."""

    def __init__(self, resources: list[dict[str, Any]], token_value: str = "good-token",  # noqa: S107
                 page_size: int = 3):
        self.resources, self.token, self.page_size = resources, token_value, page_size
        self.requests: list[tuple[str, str | None]] = []
        self.jwks: dict[str, Any] | None = None
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                stub.requests.append((self.path, self.headers.get("Authorization")))
                url = urlsplit(self.path)
                if url.path == "/jwks" and stub.jwks is not None:
                    return self._send(200, stub.jwks)
                if self.headers.get("Authorization") != f"Bearer {stub.token}":
                    return self._send(401, {"resourceType": "OperationOutcome",
                                            "issue": [{"severity": "error", "code": "login"}]})
                parts = url.path.strip("/").split("/")
                if parts[:1] != ["fhir"]:
                    return self._send(404, {})
                if len(parts) == 3:
                    found = [r for r in stub.resources if r["resourceType"] == parts[1] and r.get("id") == parts[2]]
                    return self._send(200, found[0]) if found else self._send(404, {})
                q = parse_qs(url.query)
                pid = q.get("patient", [""])[0]
                matches = [r for r in stub.resources if r["resourceType"] == parts[1]
                           and (r.get("subject") or r.get("patient") or {}).get("reference", "").endswith(pid)]
                page = int(q.get("_page", ["1"])[0])
                size = stub.page_size if parts[1] == "Condition" else 10_000
                chunk = matches[(page - 1) * size: page * size]
                bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": len(matches),
                                          "entry": [{"resource": r} for r in chunk]}
                if page * size < len(matches):
                    bundle["link"] = [{"relation": "next", "url": f"{stub.base}/{parts[1]}?patient={pid}"
                                                                  f"&_page={page + 1}"}]
                return self._send(200, bundle)

            def _send(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FhirStub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def fhir_api(tmp_path: Path, keys: Keys) -> Any:
    s = make_settings(tmp_path, keys, allow_insecure_http=True, fhir_timeout_seconds=3)
    with TestClient(create_app(s)) as c:
        yield Api(c, keys)


def test_fetch_from_fhir_server_when_not_prefetched(fhir_api: Api) -> None:
    pid, resources = ndjson_patients()[0]
    with FhirStub(resources) as stub:
        body = hook_request("patient-view", pid, None)
        body.update(fhirServer=stub.base, fhirAuthorization={
            "access_token": "good-token", "token_type": "Bearer", "expires_in": 300,
            "scope": "user/Patient.read user/Condition.read", "subject": "cds-service"})
        r = fhir_api.hook(PV, body)
        assert r.status_code == 200, r.text
        fetched_cards = check_response(r.json())
        paths = [p for p, _ in stub.requests]
        assert f"/fhir/Patient/{pid}" in paths
        assert sum(p.startswith("/fhir/Condition") for p in paths) > 1  # next links followed
        assert all(a == "Bearer good-token" for _, a in stub.requests)
    prefetched = fhir_api.hook(PV, hook_request("patient-view", pid, prefetch_from(resources))).json()["cards"]
    assert fetched_cards == prefetched


def test_partial_prefetch_is_completed_from_the_fhir_server(fhir_api: Api) -> None:
    pid, resources = ndjson_patients()[1]
    pf = prefetch_from(resources)
    del pf["procedures"], pf["observations"]
    with FhirStub(resources) as stub:
        body = hook_request("patient-view", pid, pf)
        body.update(fhirServer=stub.base + "/", fhirAuthorization={"access_token": "good-token",
                                                                  "token_type": "Bearer"})
        assert fhir_api.hook(PV, body).status_code == 200
        asked = {urlsplit(p).path.split("/")[2] for p, _ in stub.requests}
        assert asked == {"Procedure", "Observation"}


@pytest.mark.parametrize("problem", ["wrong token", "server down", "too many pages", "not allow-listed"])
def test_fhir_server_failures_are_412(tmp_path: Path, keys: Keys, problem: str) -> None:
    pid, resources = ndjson_patients()[0]
    over: dict[str, Any] = {"allow_insecure_http": True, "fhir_timeout_seconds": 2}
    if problem == "too many pages":
        over["fhir_max_pages"] = 2
    s = make_settings(tmp_path, keys, **over)
    with FhirStub(resources, page_size=1) as stub:
        if problem == "not allow-listed":
            s = s.replace(issuers=(IssuerConfig(iss=ISS, jwks_file=s.issuers[0].jwks_file,
                                                fhir_servers=("http://127.0.0.1:1/fhir",)),))
        base = stub.base
        if problem == "server down":
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                base = f"http://127.0.0.1:{sock.getsockname()[1]}/fhir"
        tok = "bad-token" if problem == "wrong token" else "good-token"
        with TestClient(create_app(s)) as c:
            body = hook_request("patient-view", pid, None)
            body.update(fhirServer=base, fhirAuthorization={"access_token": tok, "token_type": "Bearer"})
            r = c.post(f"/cds-services/{PV}", json=body, headers=auth(token(keys, f"{BASE}/cds-services/{PV}")))
        assert r.status_code == 412, r.text
        assert r.json()["error"] == "precondition_failed"
        assert tok not in r.text


def test_https_required_for_fhir_server_by_default(api: Api) -> None:
    body = hook_request("patient-view", "p1", None)
    body.update(fhirServer="http://127.0.0.1:9/fhir", fhirAuthorization={"access_token": "t", "token_type": "Bearer"})
    r = api.hook(PV, body)
    assert r.status_code == 412 and "https" in r.json()["error_description"]


def test_jku_fetched_from_allow_listed_url(tmp_path: Path, keys: Keys) -> None:
    with FhirStub([]) as stub:
        stub.jwks = keys.jwks()
        jku = stub.base.rsplit("/fhir", 1)[0] + "/jwks"
        s = make_settings(tmp_path, keys, allow_insecure_http=True)
        s = s.replace(issuers=(IssuerConfig(iss=ISS, jku=(jku,)),))
        with TestClient(create_app(s)) as c:
            assert c.get("/cds-services", headers=auth(token(keys, AUD, headers={"jku": jku}))).status_code == 200
            assert c.get("/cds-services", headers=auth(token(keys, AUD))).status_code == 200  # out of band
            n = len(stub.requests)
            assert c.get("/cds-services", headers=auth(token(keys, AUD, headers={"jku": jku}))).status_code == 200
            assert len(stub.requests) == n  # cached


# ============================================================================= end to end on loopback

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: Any = None, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("server did not start")


def test_end_to_end_uvicorn_thread_with_real_client(tmp_path: Path, keys: Keys) -> None:
    uvicorn = pytest.importorskip("uvicorn")
    s = make_settings(tmp_path, keys)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(s), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        _wait_port(port)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=10) as http:
            r = http.get("/cds-services", headers=auth(token(keys, base + "/cds-services")))
            assert r.status_code == 200 and len(r.json()["services"]) == 3
            assert http.get("/cds-services").status_code == 401
            resources = synthetic("rf1", CANCER)
            url = f"/cds-services/{PV}"
            r = http.post(url, json=hook_request("patient-view", "rf1", prefetch_from(resources)),
                          headers=auth(token(keys, base + url)))
            assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
            cards = check_response(r.json())
            _, rec = reference_rec(resources)
            check_cards_match(cards, rec)
            fb = {"feedback": [{"card": cards[0]["uuid"], "outcome": "accepted",
                                "acceptedSuggestions": [{"id": cards[0]["suggestions"][0]["uuid"]}],
                                "outcomeTimestamp": "2026-11-26T10:00:00Z"}]}
            r = http.post(url + "/feedback", json=fb, headers=auth(token(keys, base + url + "/feedback")))
            assert r.status_code == 200
        with sqlite3.connect(s.feedback_db) as conn:
            assert conn.execute("SELECT card_uuid FROM feedback").fetchall() == [(cards[0]["uuid"],)]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _serve(args: list[str], cwd: Path) -> Any:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "cds.hooks", "serve", "--host", "127.0.0.1", *args],  # noqa: S603
                            cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_cds_serve_subprocess_with_config_and_jwt(tmp_path: Path, keys: Keys) -> None:
    pytest.importorskip("uvicorn")
    (tmp_path / "jwks.json").write_text(json.dumps(keys.jwks()), encoding="utf-8")
    (tmp_path / "cds-hooks.json").write_text(json.dumps({
        "engine": "reference", "feedback_db": "fb.sqlite3", "reference_date": REF_DATE.isoformat(),
        "issuers": [{"iss": ISS, "jwks_file": "jwks.json"}]}), encoding="utf-8")
    port = _free_port()
    proc = _serve(["--port", str(port), "--config", "cds-hooks.json"], tmp_path)
    try:
        _wait_port(port, proc)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=10) as http:
            pid, resources = ndjson_patients()[0]
            url = f"/cds-services/{ES}"
            body = hook_request("encounter-start", pid, prefetch_from(resources), encounterId="e1")
            r = http.post(url, json=body, headers=auth(token(keys, base + url)))
            assert r.status_code == 200 and check_response(r.json())
            assert http.post(url, json=body).status_code == 401
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "WITHOUT AUTHENTICATION" not in err
    assert pid not in err


def test_cds_serve_insecure_dev_mode_warns_loudly(tmp_path: Path) -> None:
    pytest.importorskip("uvicorn")
    (tmp_path / "dev.json").write_text(json.dumps({"engine": "reference"}), encoding="utf-8")
    port = _free_port()
    proc = _serve(["--port", str(port), "--config", "dev.json", "--insecure-dev-no-auth"], tmp_path)
    try:
        _wait_port(port, proc)
        r = httpx.get(f"http://127.0.0.1:{port}/cds-services", timeout=10)
        assert r.status_code == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "WITHOUT AUTHENTICATION" in err and "--insecure-dev-no-auth" in err


def test_cds_serve_refuses_to_start_without_issuers(tmp_path: Path) -> None:
    pytest.importorskip("uvicorn")
    r = subprocess.run([sys.executable, "-m", "cds.hooks", "serve", "--port", "1"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no trusted issuers" in r.stderr


def test_cli_add_parser_registers_serve() -> None:
    import argparse

    from cds.hooks import cli

    p = argparse.ArgumentParser(prog="cds")
    cli.add_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["serve"])
    assert (args.host, args.port, args.config, args.insecure_dev_no_auth) == ("127.0.0.1", 8080, None, False)
    args = p.parse_args(["serve", "--host", "0.0.0.0", "--port", "9000", "--config", "c.toml",  # noqa: S104
                         "--insecure-dev-no-auth"])
    assert args.func is cli.cmd_serve and args.insecure_dev_no_auth and args.port == 9000


def test_empty_paths_finds_every_empty_value() -> None:
    assert empty_paths({"a": [1, {"b": None}], "c": "", "d": {}, "e": [], "f": 0, "g": False, "h": " "}) == \
        ["$.a[1].b", "$.c", "$.d", "$.e", "$.h"]


def test_unexpected_errors_are_500_without_details(api: Api, monkeypatch: Any, caplog: Any) -> None:
    import cds.hooks.app as app_module

    def boom(*a: Any, **k: Any) -> Any:
        raise KeyError("Patient p1 born 1958-03-01")  # a message that must not leak

    monkeypatch.setattr(app_module, "facts_from_resources", boom)
    caplog.set_level(logging.DEBUG)
    r = api.hook(PV, hook_request("patient-view", "p1", prefetch_from(synthetic("p1"))))
    assert r.status_code == 500 and r.json()["error"] == "internal_error"
    assert "1958" not in r.text and "1958" not in caplog.text and "KeyError" in caplog.text


def test_client_values_cannot_forge_log_lines(api: Api, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    body = hook_request("patient-view", "p1", prefetch_from(synthetic("p1")))
    body["hookInstance"] = "abc\nCRITICAL forged line"
    assert api.hook(PV, body).status_code == 200
    assert "\nCRITICAL forged" not in caplog.text and "abc?CRITICAL?forged?line" in caplog.text
