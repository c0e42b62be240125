"""The attack mix of tools/attack_service.py at small scale, against the app in process.

~40 calls: valid patient-view calls (200, spec-valid cards) with every attack of the tool shuffled in
(alg none, HS256 key confusion, expired, wrong aud, unknown iss, replayed jti, oversized token: 401;
oversized body: 413; bad signature: 401). The full run (2,000 calls, 8 concurrent, against
``cds serve`` on loopback) is ``python tools/attack_service.py``.
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("jwt")
pytest.importorskip("httpx")
pytest.importorskip("cryptography")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from cds.hooks import IssuerConfig, Settings, create_app  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

_TOOL = Path(__file__).resolve().parents[1] / "tools" / "attack_service.py"
_spec = importlib.util.spec_from_file_location("cds_attack_service", _TOOL)
attack = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(attack)

BASE = "http://testserver"


@pytest.fixture(scope="module")
def keys():
    return attack.Keys()


@pytest.fixture(scope="module")
def client(tmp_path_factory, keys):
    import json

    tmp = tmp_path_factory.mktemp("attack")
    (tmp / "jwks.json").write_text(json.dumps(keys.jwks()), encoding="utf-8")
    settings = Settings(base_url=BASE, issuers=(IssuerConfig(iss=attack.ISS, jwks_file=str(tmp / "jwks.json")),),
                        feedback_db=str(tmp / "feedback.sqlite3"))  # the service default engine: durable-rules
    with TestClient(create_app(settings)) as c:
        yield c


def _small_bodies() -> list[bytes]:
    return [b for b in attack.patient_bodies() if len(b) < 100_000]


def test_attack_mix_small_scale(client, keys):
    mix = attack.Mix(keys, BASE, _small_bodies(), seed=11)
    plan = mix.plan(calls=22, attacks_per_kind=2)
    assert len(plan) == 40 and set(plan) == {"valid", *attack.EXPECTED}
    tally = attack.Tally()
    for kind in plan:
        for sub_kind, headers, body, expected in mix.request(kind):
            t = time.perf_counter()
            r = client.post(mix.url_path, headers=headers, content=body)
            tally.record(sub_kind, expected, r.status_code, r.content, time.perf_counter() - t)
    report = tally.report(0.0)
    assert tally.bad == []
    assert report["valid_calls"] == report["valid_ok"] == 22 + 2  # + the first use of each replayed token
    assert report["attacks_sent"] == report["attacks_refused"] == 2 * len(attack.EXPECTED)
    assert report["cards"] > 0


def test_every_attack_alone_is_refused_with_its_status(client, keys):
    mix = attack.Mix(keys, BASE, _small_bodies(), seed=3)
    for kind, status in attack.EXPECTED.items():
        steps = mix.request(kind)
        for sub_kind, headers, body, expected in steps:
            r = client.post(mix.url_path, headers=headers, content=body)
            assert r.status_code == expected, (kind, sub_kind, r.status_code, r.text[:200])
        assert steps[-1][3] == status
        if status == 401:
            assert r.headers.get("www-authenticate", "").startswith("Bearer error=\"invalid_token\"")


def test_card_checker_rejects_invalid_cards():
    good = {"cards": [{"summary": "s", "indicator": "info", "source": {"label": "cds"}}]}
    assert attack.card_problems(good) == []
    assert attack.card_problems({"cards": [{"summary": "x" * 140, "indicator": "info", "source": {"label": "c"}}]})
    assert attack.card_problems({"cards": [{"summary": "s", "indicator": "hot", "source": {"label": "c"}}]})
    assert attack.card_problems({"cards": [{"summary": "s", "indicator": "info", "source": {}}]})
    assert attack.card_problems({"cards": [{"summary": "s", "indicator": "info", "source": {"label": "c"},
                                            "suggestions": [{"label": "x"}]}]})  # selectionBehavior missing
    assert attack.card_problems({"nope": []})


# ----------------------------------------------------------------------------------- found by tools/fuzz_report.py
SURROGATE_BUNDLE = (b'{"resourceType": "Bundle", "type": "collection", "entry": [{"resource": '
                    b'{"resourceType": "Patient", "id": "\\ud800", "birthDate": "1960-01-01"}}]}')


# Found by tools/fuzz_report.py (test_fuzz.py's FHIR target at 5,000 examples): a Patient.id holding a
# lone surrogate (JSON escape \ud800) crashed the case-id hash; such input is now a FactsError.
def test_fhir_bundle_with_a_surrogate_patient_id_is_refused_not_crashed():
    import datetime as dt
    import json

    import cds
    from cds.fhir import facts_from_bundle

    bundle = json.loads(SURROGATE_BUNDLE)
    try:
        mapping = facts_from_bundle(bundle, reference_date=dt.date(2024, 1, 1))
    except cds.FactsError:
        return
    json.dumps(mapping.case)


def test_cli_fhir_explain_with_a_surrogate_patient_id_exits_2(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "bundle.json"
    path.write_bytes(SURROGATE_BUNDLE)
    run = subprocess.run([sys.executable, "-m", "cds", "fhir", "explain", str(path)],  # noqa: S603 - our own CLI
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, (run.returncode, run.stderr[-300:])
