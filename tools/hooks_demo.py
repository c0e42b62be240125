"""End-to-end demo of the CDS Hooks service with real security, on loopback.

1. generates an ES384 key pair for a pretend EHR, writes its JWK Set and a service config;
2. starts `cds serve --config ...` on 127.0.0.1 (a free port);
3. builds a patient-view request whose prefetch comes from a Synthea R4 bundle, signs a JWT for the
   exact URL called, and prints the cards;
4. shows that an unsigned call is refused (401);
5. prints the FHIR GuidanceResponse of a red-flag case and validates it with fhir.resources (R4B).

    python tools/hooks_demo.py [--bundle tests/fixtures/fhir/synthea-r4-bundles/<file>.json]

Needs the hooks extra (and fhir.resources for step 5): pip install '.[hooks]' fhir.resources
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = ROOT / "tests/fixtures/fhir/synthea-r4-bundles/Asa_Hermiston_4384bf23-1dc3-48ca-8c84-89fbaff201ae.json"
ISS = "https://ehr.demo.invalid"
PREFETCH = {"patient": "Patient", "conditions": "Condition", "observations": "Observation",
            "medications": "MedicationRequest", "procedures": "Procedure",
            "questionnaireResponses": "QuestionnaireResponse"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    import httpx
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cds-hooks-demo-"))
    key = ec.generate_private_key(ec.SECP384R1())
    public = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    public.update(kid="demo-key", alg="ES384", use="sig")
    (work / "ehr-jwks.json").write_text(json.dumps({"keys": [public]}))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    (work / "cds-hooks.json").write_text(json.dumps({
        "base_url": base, "feedback_db": str(work / "feedback.sqlite"),
        "issuers": [{"iss": ISS, "jwks_file": "ehr-jwks.json"}]}))

    server = subprocess.Popen([sys.executable, "-m", "cds", "serve", "--host", "127.0.0.1", "--port", str(port),
                               "--config", str(work / "cds-hooks.json")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)

    def token(url: str) -> str:
        now = int(time.time())
        claims = {"iss": ISS, "sub": "demo-client", "aud": url, "exp": now + 300, "iat": now, "jti": str(uuid.uuid4())}
        return jwt.encode(claims, key, algorithm="ES384", headers={"kid": "demo-key", "typ": "JWT"})

    try:
        for _ in range(150):
            try:
                if httpx.get(f"{base}/cds-services", timeout=1).status_code in (200, 401):
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        url = f"{base}/cds-services"
        r = httpx.get(url, headers={"Authorization": f"Bearer {token(url)}"}, timeout=10)
        print(f"GET /cds-services -> {r.status_code}: {[s['id'] for s in r.json()['services']]}")

        bundle = json.loads(args.bundle.read_text())
        resources = [e["resource"] for e in bundle["entry"]]
        patient = next(r for r in resources if r["resourceType"] == "Patient")
        prefetch = {k: ({"resourceType": "Bundle", "type": "searchset",
                         "entry": [{"resource": r} for r in resources if r["resourceType"] == t]}
                        if k != "patient" else patient) for k, t in PREFETCH.items()}
        body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "fhirServer": None,
                "context": {"userId": "Practitioner/demo", "patientId": patient["id"]}, "prefetch": prefetch}
        body.pop("fhirServer")
        url = f"{base}/cds-services/back-hip-pain-patient-view"
        r = httpx.post(url, json=body, headers={"Authorization": f"Bearer {token(url)}"}, timeout=30)
        print(f"POST patient-view ({args.bundle.name}) -> {r.status_code}")
        for card in r.json()["cards"]:
            print(f"  [{card['indicator']}] {card['summary']}")
        r = httpx.post(url, json=body, timeout=30)
        print(f"POST without a token -> {r.status_code} {r.json().get('error')}")
    finally:
        server.terminate()
        server.wait(timeout=10)

    import cds
    from cds.fhir.guidance import to_guidance_response

    case = json.loads((ROOT / "examples/cauda-equina.json").read_text())
    gr = to_guidance_response(cds.evaluate(case), subject="Patient/example", request_id="demo")
    print(f"\nGuidanceResponse for examples/cauda-equina.json: status {gr['status']}, "
          f"{len(gr.get('contained', []))} contained resource(s)")
    try:
        from fhir.resources.R4B.guidanceresponse import GuidanceResponse
    except ImportError:
        print("fhir.resources not installed: skipped validation")
        return 0
    model = GuidanceResponse.model_validate(gr) if hasattr(GuidanceResponse, "model_validate") else GuidanceResponse.parse_obj(gr)
    print(f"validated with fhir.resources R4B: {type(model).__name__} id={model.id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
