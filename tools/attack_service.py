"""Attack the CDS Hooks service on loopback: bounded concurrent load with JWT and body attacks mixed in.

    python tools/attack_service.py [--calls 2000] [--attacks-per-kind 25] [--concurrency 8] [--max-seconds 120]

Starts ``python -m cds serve`` on 127.0.0.1 on a free port with a generated config (a fresh ES384 key
pair; the public JWK Set in a file, the issuer allow-listed, ``base_url`` the loopback URL so ``aud`` is
exact, the service's default engine: durable-rules with the cross-check), then sends ``--calls`` valid
patient-view calls (each with its own freshly signed ES384 token; small synthetic patients with and
without red flags, and now and then a Synthea bundle of ~0.5 MB) with ``--attacks-per-kind`` of each
attack below shuffled in (fixed seed), ``--concurrency`` at a time, stopping new calls after
``--max-seconds``. Every valid call must be answered 200 with spec-valid cards; every attack must be
refused with its status. Prints the counts and p50/p99 latencies, stops the server, exits 1 on any
unexpected answer. Loopback only; nothing leaves the machine.

Attacks (status expected):
  alg-none (401)          unsigned token, ``alg: none``
  hs256-confusion (401)   HS256 keyed with the issuer's public key (key-confusion attack)
  expired (401)           exp two minutes in the past (beyond the 30 s leeway)
  wrong-aud (401)         aud is another endpoint of the same service
  unknown-iss (401)       iss not configured, otherwise a well-signed token
  replayed-jti (401)      a token already accepted once, sent again (its first use is a valid call)
  oversized-token (401)   a well-signed token over max_token_bytes (8 KiB) through a padding claim
  oversized-body (413)    a valid token with a body over max_body_bytes (5 MiB)
  bad-signature (401)     signed by another EC key under the issuer's kid
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ISS = "https://ehr.example.org"
SERVICE = "back-hip-pain-patient-view"
KID = "ec-1"
MAX_BODY = 5 * 1024 * 1024          # the service defaults (cds.hooks.settings.Settings)
MAX_TOKEN = 8192
EXPECTED = {"alg-none": 401, "hs256-confusion": 401, "expired": 401, "wrong-aud": 401, "unknown-iss": 401,
            "replayed-jti": 401, "oversized-token": 401, "oversized-body": 413, "bad-signature": 401}
CARD_KEYS = {"uuid", "summary", "detail", "indicator", "source", "suggestions", "selectionBehavior",
             "overrideReasons", "links"}


# ------------------------------------------------------------------------------------ tokens
def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Keys:
    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec

        self.ec = ec.generate_private_key(ec.SECP384R1())
        self.other = ec.generate_private_key(ec.SECP384R1())

    def jwks(self) -> dict[str, Any]:
        import jwt

        pub = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec.public_key()))
        return {"keys": [{**pub, "kid": KID, "alg": "ES384", "use": "sig"}]}


def claims(aud: str, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    c: dict[str, Any] = {"iss": ISS, "aud": aud, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4()),
                         "sub": "ehr-client"}
    c.update(over)
    return c


def sign(keys: Keys, aud: str, *, key: Any = None, **over: Any) -> str:
    import jwt

    return jwt.encode(claims(aud, **over), key or keys.ec, algorithm="ES384", headers={"kid": KID, "typ": "JWT"})


def _unsigned(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}."


def _hs256_confusion(keys: Keys, aud: str) -> str:
    from cryptography.hazmat.primitives import serialization

    secret = keys.ec.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": KID}).encode())
    body = b64url(json.dumps(claims(aud)).encode())
    return f"{head}.{body}.{b64url(hmac.new(secret, f'{head}.{body}'.encode(), hashlib.sha256).digest())}"


# ------------------------------------------------------------------------------------ bodies
def _condition(cid: str, pid: str, code: str, display: str, onset: str) -> dict[str, Any]:
    return {"resourceType": "Condition", "id": cid, "subject": {"reference": f"Patient/{pid}"},
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                           "code": "active"}]},
            "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                               "code": "confirmed"}]},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}]},
            "onsetDateTime": onset}


def _searchset(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}


_TYPES = {"conditions": "Condition", "observations": "Observation", "medications": "MedicationRequest",
          "procedures": "Procedure", "questionnaireResponses": "QuestionnaireResponse"}


def hook_body(pid: str, resources: list[dict[str, Any]]) -> dict[str, Any]:
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    prefetch: dict[str, Any] = {"patient": patient}
    for key, rtype in _TYPES.items():
        prefetch[key] = _searchset([r for r in resources if r["resourceType"] == rtype])
    return {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
            "context": {"userId": "Practitioner/example", "patientId": pid}, "prefetch": prefetch}


def patient_bodies() -> list[bytes]:
    """Valid request bodies: synthetic patients (back pain with/without red-flag problems) and Synthea bundles."""
    problems = [(), (("399490008", "Adenocarcinoma of prostate"),),
                (("386661006", "Fever", "2026-11-24"), ("44054006", "Type 2 diabetes mellitus")),
                (("44054006", "Type 2 diabetes mellitus"),), (("64859006", "Osteoporosis"),)]
    out = []
    for i, conds in enumerate(problems):
        for birth in ("1958-03-01", "1990-07-15"):
            pid = f"atk{i}{birth[:4]}"
            res: list[dict[str, Any]] = [{"resourceType": "Patient", "id": pid, "gender": "male", "birthDate": birth},
                                         _condition(f"{pid}-lbp", pid, "279039007", "Low back pain",
                                                    "2026-11-10")]
            for j, (code, display, *onset) in enumerate(conds):
                res.append(_condition(f"{pid}-c{j}", pid, code, display, onset[0] if onset else "2019-05-01"))
            out.append(json.dumps(hook_body(pid, res)).encode())
    small = len(out)
    for path in sorted((ROOT / "tests" / "fixtures" / "fhir" / "synthea-r4-bundles").glob("*.json")):
        b = json.loads(path.read_text(encoding="utf-8"))
        res = [e["resource"] for e in b["entry"]]
        pid = next(r["id"] for r in res if r["resourceType"] == "Patient")
        out.append(json.dumps(hook_body(pid, res)).encode())
    # ~1 in 11 calls carries a Synthea bundle: weight the small bodies
    return out[:small] * 8 + out[small:] if len(out) > small else out


# ------------------------------------------------------------------------------------ the mix
class Mix:
    """Builds each request of the mix: (kind, headers, body, expected status). ``kind`` "valid" or an attack."""

    def __init__(self, keys: Keys, base: str, bodies: list[bytes], seed: int = 5):
        self.keys, self.base, self.bodies = keys, base.rstrip("/"), bodies
        self.url_path = f"/cds-services/{SERVICE}"
        self.aud = self.base + self.url_path
        self.rng = random.Random(seed)  # noqa: S311 - test traffic
        self.oversized = b'{"hook": "patient-view", "pad": "' + b"x" * (MAX_BODY + 1024) + b'"}'

    def plan(self, calls: int, attacks_per_kind: int) -> list[str]:
        kinds = ["valid"] * calls + [k for k in EXPECTED for _ in range(attacks_per_kind)]
        self.rng.shuffle(kinds)
        return kinds

    def body(self) -> bytes:
        return self.rng.choice(self.bodies)

    def request(self, kind: str) -> list[tuple[str, dict[str, str], bytes, int]]:
        """One or two requests (a replay is preceded by the token's first, valid use)."""
        k, aud = self.keys, self.aud
        if kind == "valid":
            return [("valid", self._auth(sign(k, aud)), self.body(), 200)]
        if kind == "replayed-jti":
            tok = sign(k, aud)
            return [("valid", self._auth(tok), self.body(), 200), (kind, self._auth(tok), self.body(), 401)]
        if kind == "oversized-body":
            return [(kind, self._auth(sign(k, aud)), self.oversized, 413)]
        tok = {
            "alg-none": lambda: _unsigned({"alg": "none", "typ": "JWT", "kid": KID}, claims(aud)),
            "hs256-confusion": lambda: _hs256_confusion(k, aud),
            "expired": lambda: sign(k, aud, exp=int(time.time()) - 120, iat=int(time.time()) - 600),
            "wrong-aud": lambda: sign(k, self.base + "/cds-services/back-hip-pain-encounter-start"),
            "unknown-iss": lambda: sign(k, aud, iss="https://evil.example.org"),
            "oversized-token": lambda: sign(k, aud, padding="x" * (MAX_TOKEN + 1000)),
            "bad-signature": lambda: sign(k, aud, key=k.other),
        }[kind]()
        return [(kind, self._auth(tok), self.body(), EXPECTED[kind])]

    @staticmethod
    def _auth(tok: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {tok}", "Content-Type": "application/json"}


# ------------------------------------------------------------------------------------ checks
def _no_empty(value: Any, path: str = "$") -> list[str]:
    if value is None or value == "" or value == [] or value == {}:
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _no_empty(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _no_empty(v, f"{path}[{i}]")]
    return []


def card_problems(payload: Any) -> list[str]:
    """CDS Hooks 2.0 response checks (independent of cds.hooks): [] when spec-valid."""
    if not isinstance(payload, dict) or "cards" not in payload or not isinstance(payload["cards"], list):
        return ["response is not {cards: [...]}"]
    out = []
    for i, c in enumerate(payload["cards"]):
        w = f"cards[{i}]"
        if not isinstance(c, dict):
            out.append(f"{w} not an object")
            continue
        if set(c) - CARD_KEYS:
            out.append(f"{w} unknown keys {sorted(set(c) - CARD_KEYS)}")
        if not isinstance(c.get("summary"), str) or not 0 < len(c["summary"]) < 140:
            out.append(f"{w}.summary missing or not < 140 characters")
        if c.get("indicator") not in ("info", "warning", "critical"):
            out.append(f"{w}.indicator not info/warning/critical")
        src = c.get("source")
        if not isinstance(src, dict) or not isinstance(src.get("label"), str) or not src["label"]:
            out.append(f"{w}.source.label missing")
        if "uuid" in c:
            try:
                uuid.UUID(c["uuid"])
            except (ValueError, TypeError, AttributeError):
                out.append(f"{w}.uuid not a UUID")
        if "suggestions" in c:
            if c.get("selectionBehavior") not in ("at-most-one", "any"):
                out.append(f"{w}.selectionBehavior required with suggestions")
            for j, s in enumerate(c["suggestions"]):
                if not isinstance(s, dict) or not isinstance(s.get("label"), str) or not s["label"]:
                    out.append(f"{w}.suggestions[{j}].label missing")
                for a in (s.get("actions") or []) if isinstance(s, dict) else []:
                    if a.get("type") not in ("create", "update", "delete") or not a.get("description"):
                        out.append(f"{w}.suggestions[{j}] action without type/description")
        for r in c.get("overrideReasons", []):
            if not (isinstance(r, dict) and r.get("code") and r.get("system") and r.get("display")):
                out.append(f"{w}.overrideReasons entry without code/system/display")
        for ln in c.get("links", []):
            if not (isinstance(ln, dict) and ln.get("label") and ln.get("url") and ln.get("type") in
                    ("absolute", "smart")):
                out.append(f"{w}.links entry invalid")
        out += [f"{w}: empty value at {p}" for p in _no_empty(c)]
    return out


class Tally:
    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()
        self.ok: Counter[str] = Counter()
        self.bad: list[str] = []
        self.latency: dict[str, list[float]] = {"valid": [], "attack": []}
        self.cards = 0

    def record(self, kind: str, expected: int, status: int | None, body: bytes, seconds: float,
               error: str | None = None) -> None:
        self.sent[kind] += 1
        self.latency["valid" if kind == "valid" else "attack"].append(seconds)
        if status != expected:
            self.bad.append(f"{kind}: status {status} (expected {expected}){' ' + error if error else ''} "
                            f"{body[:160]!r}")
            return
        if kind == "valid":
            try:
                payload = json.loads(body)
            except ValueError:
                self.bad.append("valid: 200 with a body that is not JSON")
                return
            problems = card_problems(payload)
            if problems:
                self.bad.append("valid: cards not spec-valid: " + "; ".join(problems[:3]))
                return
            self.cards += len(payload["cards"])
        else:
            try:
                err = json.loads(body)
            except ValueError:
                err = None
            if not (isinstance(err, dict) and err.get("error")):
                self.bad.append(f"{kind}: refused with {status} but without a JSON error body")
                return
        self.ok[kind] += 1

    def report(self, elapsed: float) -> dict[str, Any]:
        def pct(xs: list[float], q: int) -> float | None:
            if len(xs) < 2:
                return round(xs[0] * 1000, 1) if xs else None
            return round(statistics.quantiles(xs, n=100, method="inclusive")[q - 1] * 1000, 1)
        attacks = {k: {"sent": self.sent[k], "refused": self.ok[k]} for k in EXPECTED}
        return {"seconds": round(elapsed, 1), "valid_calls": self.sent["valid"], "valid_ok": self.ok["valid"],
                "cards": self.cards, "attacks_sent": sum(self.sent[k] for k in EXPECTED),
                "attacks_refused": sum(self.ok[k] for k in EXPECTED), "attacks": attacks,
                "valid_latency_ms": {"p50": pct(self.latency["valid"], 50), "p99": pct(self.latency["valid"], 99)},
                "attack_latency_ms": {"p50": pct(self.latency["attack"], 50),
                                      "p99": pct(self.latency["attack"], 99)},
                "unexpected": len(self.bad), "unexpected_examples": self.bad[:10]}


# ------------------------------------------------------------------------------------ server
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(tmp: Path, keys: Keys, port: int, engine: str) -> subprocess.Popen[bytes]:
    (tmp / "ehr-jwks.json").write_text(json.dumps(keys.jwks()), encoding="utf-8")
    config = {"base_url": f"http://127.0.0.1:{port}", "engine": engine, "feedback_db": str(tmp / "feedback.sqlite3"),
              "issuers": [{"iss": ISS, "jwks_file": str(tmp / "ehr-jwks.json")}]}
    (tmp / "cds-hooks.json").write_text(json.dumps(config), encoding="utf-8")
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "cds", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--config", str(tmp / "cds-hooks.json"), "--log-level", "warning"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cds serve exited with {proc.returncode}: {(tmp / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/cds-services", timeout=2).status_code == 401:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError("cds serve did not answer within 60 s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def run_load(base: str, mix: Mix, plan: list[str], concurrency: int, max_seconds: float, tally: Tally) -> float:
    import httpx

    queue: asyncio.Queue[str] = asyncio.Queue()
    for k in plan:
        queue.put_nowait(k)
    deadline = time.monotonic() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=httpx.Timeout(60.0)) as client:
        async def worker() -> None:
            while time.monotonic() < deadline:
                try:
                    kind = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                for sub_kind, headers, body, expected in mix.request(kind):
                    t = time.perf_counter()
                    try:
                        r = await client.post(mix.url_path, headers=headers, content=body)
                        tally.record(sub_kind, expected, r.status_code, r.content, time.perf_counter() - t)
                    except httpx.HTTPError as exc:
                        tally.record(sub_kind, expected, None, b"", time.perf_counter() - t, type(exc).__name__)
        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000, help="valid calls (a replay attack adds one more)")
    ap.add_argument("--attacks-per-kind", type=int, default=25)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=120.0)
    ap.add_argument("--engine", choices=("durable-rules", "reference"), default="durable-rules")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if not (0 < args.calls <= 20_000 and 0 <= args.attacks_per_kind <= 1000 and 0 < args.concurrency <= 64
            and 0 < args.max_seconds <= 600):
        ap.error("keep it bounded: calls <= 20000, attacks-per-kind <= 1000, concurrency <= 64, max-seconds <= 600")
    keys = Keys()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="cds-attack-") as d:
        tmp = Path(d)
        t = time.monotonic()
        proc = start_server(tmp, keys, port, args.engine)
        print(f"cds serve up on {base} (pid {proc.pid}, engine {args.engine}) in {time.monotonic() - t:.1f} s",
              flush=True)
        tally = Tally()
        try:
            mix = Mix(keys, base, patient_bodies(), args.seed)
            plan = mix.plan(args.calls, args.attacks_per_kind)
            elapsed = asyncio.run(run_load(base, mix, plan, args.concurrency, args.max_seconds, tally))
            alive = proc.poll() is None
        finally:
            stop_server(proc)
        report = tally.report(elapsed)
        report.update(server_alive_at_end=alive, concurrency=args.concurrency, planned=len(plan),
                      completed_all=sum(tally.sent.values()) >= len(plan))
        server_log = (tmp / "server.log").read_text(encoding="utf-8", errors="replace")
        report["server_errors_logged"] = sum(1 for line in server_log.splitlines() if " ERROR " in line)
    print(f"valid calls: {report['valid_calls']} sent, {report['valid_ok']} answered 200 with spec-valid cards "
          f"({report['cards']} cards); p50 {report['valid_latency_ms']['p50']} ms, p99 "
          f"{report['valid_latency_ms']['p99']} ms")
    print(f"attacks: {report['attacks_sent']} sent, {report['attacks_refused']} refused as expected; p50 "
          f"{report['attack_latency_ms']['p50']} ms, p99 {report['attack_latency_ms']['p99']} ms")
    for k, v in report["attacks"].items():
        print(f"  {k:<16} {v['refused']:>4}/{v['sent']:<4} refused with {EXPECTED[k]}")
    print(f"{report['seconds']} s wall, concurrency {args.concurrency}; server alive at the end: {alive}; "
          f"ERROR lines in the server log: {report['server_errors_logged']}")
    for b in report["unexpected_examples"]:
        print("  UNEXPECTED:", b)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1), encoding="utf-8")
    ok = (not tally.bad and alive and report["completed_all"] and report["valid_ok"] == report["valid_calls"]
          and report["attacks_refused"] == report["attacks_sent"])
    if not report["completed_all"]:
        print(f"stopped at the time limit: {sum(tally.sent.values())} of {len(plan)} planned requests sent")
    print("RESULT:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
