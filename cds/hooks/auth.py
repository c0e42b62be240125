"""CDS Hooks client authentication: the signed JWT in ``Authorization: Bearer``.

What is checked, in this order (the first failure is a 401; reasons are short fixed codes and never
echo the token):

1. an ``Authorization: Bearer <JWT>`` header no longer than ``max_token_bytes``;
2. the JOSE header: ``alg`` one of the configured asymmetric algorithms (ES384 and RS384 by default;
   ``none`` and HMAC can never be configured), ``typ`` JWT when present, ``kid`` present;
3. ``iss`` (read before the signature is checked, only to choose the keys) is allow-listed;
4. the key: from the JWK Set of the ``jku`` header when that URL is allow-listed for the issuer
   (fetched over https, size- and time-bounded, cached), else the issuer's out-of-band JWK Set
   (``jwks_file``, or its configured ``jku`` URLs); the JWK with the header's ``kid`` whose key type
   fits ``alg`` (and whose own ``alg``, if any, equals it);
5. the signature and the claims: ``iss``, ``aud``, ``exp``, ``iat`` and ``jti`` required; ``aud`` is the
   exact URL called (a string, or a one-element array holding it); ``exp`` in the future and ``iat``
   not in the future (``leeway_seconds`` either way); ``exp - iat`` at most
   ``max_token_lifetime_seconds``; ``sub`` allow-listed when the issuer lists any;
6. ``jti`` not seen before for this issuer (in-memory cache kept until the token expires; bounded:
   when full, expired entries go first, then the oldest - tokens are short-lived, so a full cache
   only shortens how long the oldest nonce is remembered).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import jwt
from jwt import PyJWK

from cds.hooks.settings import IssuerConfig, Settings

log = logging.getLogger("cds.hooks")


class AuthError(Exception):
    """Authentication failed. ``reason`` is a short code safe to return and log."""

    def __init__(self, reason: str, description: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.description = description or reason.replace("_", " ")


class ReplayCache:
    """(iss, jti) -> expiry, bounded, thread-safe."""

    def __init__(self, max_size: int, clock: Callable[[], float] = time.time):
        self.max_size = max_size
        self.clock = clock
        self._items: collections.OrderedDict[tuple[str, str], float] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def check_and_add(self, key: tuple[str, str], expires_at: float) -> bool:
        """True when the key is new (and records it); False when it was already seen and is not expired."""
        now = self.clock()
        with self._lock:
            seen = self._items.get(key)
            if seen is not None and seen > now:
                return False
            if seen is not None:
                del self._items[key]
            if len(self._items) >= self.max_size:
                for k in [k for k, exp in self._items.items() if exp <= now]:
                    del self._items[k]
                while len(self._items) >= self.max_size:
                    self._items.popitem(last=False)
            self._items[key] = expires_at
            return True


class JwksStore:
    """JWK Sets from files (read once) and allow-listed URLs (fetched, cached, bounded)."""

    def __init__(self, settings: Settings, client_factory: Callable[[], httpx.AsyncClient] | None = None):
        self.settings = settings
        self._files: dict[str, Mapping[str, Any]] = {}
        self._urls: dict[str, tuple[float, Mapping[str, Any]]] = {}
        self._last_refresh: dict[str, float] = {}
        self._client_factory = client_factory or (lambda: httpx.AsyncClient(
            timeout=httpx.Timeout(5.0), follow_redirects=False, trust_env=False))
        self._lock = asyncio.Lock()

    def from_file(self, path: str) -> Mapping[str, Any]:
        if path not in self._files:
            try:
                with open(path, encoding="utf-8") as fh:
                    data = json.load(fh)
            except (OSError, ValueError) as exc:
                log.error("cannot read JWK Set file %s: %s", path, type(exc).__name__)
                raise AuthError("jwks_unavailable") from None
            self._files[path] = _check_jwks(data)
        return self._files[path]

    async def from_url(self, url: str, *, refresh: bool = False) -> Mapping[str, Any]:
        now = time.monotonic()
        cached = self._urls.get(url)
        if cached and not refresh and now - cached[0] < self.settings.jwks_cache_seconds:
            return cached[1]
        if cached and refresh and now - self._last_refresh.get(url, 0.0) < 60:
            return cached[1]  # at most one forced refresh per minute per URL
        async with self._lock:
            self._last_refresh[url] = now
            try:
                async with self._client_factory() as client:
                    async with client.stream("GET", url, headers={"Accept": "application/json"}) as resp:
                        if resp.status_code != 200:
                            raise AuthError("jwks_unavailable")
                        body = bytearray()
                        async for chunk in resp.aiter_bytes():
                            body += chunk
                            if len(body) > self.settings.jwks_max_bytes:
                                raise AuthError("jwks_unavailable")
                data = _check_jwks(json.loads(bytes(body)))
            except AuthError:
                log.warning("JWK Set URL %s could not be fetched", url)
                if cached:
                    return cached[1]
                raise
            except (httpx.HTTPError, ValueError):
                log.warning("JWK Set URL %s could not be fetched or parsed", url)
                if cached:
                    return cached[1]
                raise AuthError("jwks_unavailable") from None
            self._urls[url] = (now, data)
            return data


def _check_jwks(data: Any) -> Mapping[str, Any]:
    if not isinstance(data, Mapping) or not isinstance(data.get("keys"), list):
        raise AuthError("jwks_unavailable")
    return data


_FAMILY = {"ES": "EC", "RS": "RSA", "PS": "RSA"}


def _select_key(jwks: Mapping[str, Any], kid: str, alg: str) -> Any | None:
    for jwk in jwks.get("keys", []):
        if not isinstance(jwk, Mapping) or jwk.get("kid") != kid:
            continue
        if jwk.get("kty") != _FAMILY.get(alg[:2]):
            continue
        if jwk.get("alg") not in (None, alg):
            continue
        if jwk.get("use") not in (None, "sig"):
            continue
        if any(k in jwk for k in ("d", "p", "q", "k")):
            continue  # private or symmetric material never verifies anything here
        try:
            return PyJWK(dict(jwk), algorithm=alg).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
            continue
    return None


class Authenticator:
    def __init__(self, settings: Settings, jwks: JwksStore | None = None, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.jwks = jwks or JwksStore(settings)
        self.clock = clock
        self.replay = ReplayCache(settings.jti_cache_size, clock)

    async def authenticate(self, authorization: str | None, expected_aud: str) -> dict[str, Any]:
        """The verified claims, or AuthError."""
        s = self.settings
        if not authorization:
            raise AuthError("missing_token", "Authorization: Bearer <JWT> is required")
        if len(authorization) > s.max_token_bytes + 7:
            raise AuthError("token_too_large")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("missing_token", "Authorization: Bearer <JWT> is required")
        if len(token) > s.max_token_bytes:
            raise AuthError("token_too_large")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed_token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in s.algorithms:
            raise AuthError("algorithm_not_allowed",
                            f"alg must be one of {', '.join(s.algorithms)} (none and HMAC are refused)")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.upper() != "JWT"):
            raise AuthError("malformed_token", "typ must be JWT")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("missing_kid", "the JWT header must name its key (kid)")
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise AuthError("malformed_token") from None
        iss = unverified.get("iss")
        issuer = s.issuer(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise AuthError("unknown_issuer", "iss is not a trusted CDS client")
        key = await self._key(issuer, header, kid, alg)
        try:
            claims = jwt.decode(
                token, key=key, algorithms=[alg], issuer=issuer.iss, leeway=s.leeway_seconds,
                options={"require": ["iss", "aud", "exp", "iat", "jti"], "verify_aud": False,
                         "verify_signature": True, "verify_exp": True, "verify_iat": True, "verify_nbf": True})
        except jwt.ExpiredSignatureError:
            raise AuthError("token_expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token_not_yet_valid") from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad_signature") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError("missing_claim", f"required claim missing: {exc.claim}") from None
        except jwt.InvalidIssuerError:
            raise AuthError("unknown_issuer") from None
        except jwt.PyJWTError:
            raise AuthError("invalid_token") from None
        now = self.clock()
        aud = claims.get("aud")
        if not (aud == expected_aud or (isinstance(aud, list) and aud == [expected_aud])):
            raise AuthError("wrong_audience", "aud must be the exact URL of the endpoint called")
        exp, iat = claims.get("exp"), claims.get("iat")
        if not (isinstance(exp, (int, float)) and isinstance(iat, (int, float))) or isinstance(exp, bool) \
                or isinstance(iat, bool):
            raise AuthError("invalid_token", "exp and iat must be numbers")
        if iat > now + s.leeway_seconds:
            raise AuthError("token_not_yet_valid")
        if exp <= now - s.leeway_seconds:
            raise AuthError("token_expired")
        if exp - iat > s.max_token_lifetime_seconds:
            raise AuthError("token_lifetime_too_long",
                            f"exp - iat must be at most {s.max_token_lifetime_seconds} seconds")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > 256:
            raise AuthError("invalid_token", "jti must be a non-empty string of at most 256 characters")
        if issuer.sub and claims.get("sub") not in issuer.sub:
            raise AuthError("unknown_subject", "sub is not allow-listed for this issuer")
        if not self.replay.check_and_add((issuer.iss, jti), float(exp) + s.leeway_seconds):
            raise AuthError("token_replayed", "this jti was already used")
        return claims

    async def _key(self, issuer: IssuerConfig, header: Mapping[str, Any], kid: str, alg: str) -> Any:
        jku = header.get("jku")
        if jku is not None:
            if not isinstance(jku, str) or jku not in issuer.jku:
                raise AuthError("jku_not_allowed", "the jku URL is not allow-listed for this issuer")
            urls: list[str] = [jku]
            files: list[str] = []
        else:
            urls, files = ([], [issuer.jwks_file]) if issuer.jwks_file else (list(issuer.jku), [])
        for path in files:
            key = _select_key(self.jwks.from_file(path), kid, alg)
            if key is not None:
                return key
        for url in urls:
            key = _select_key(await self.jwks.from_url(url), kid, alg)
            if key is None:  # key rotation: refetch (rate-limited) before giving up
                key = _select_key(await self.jwks.from_url(url, refresh=True), kid, alg)
            if key is not None:
                return key
        raise AuthError("unknown_key", "no usable key with this kid and alg in the issuer's JWK Set")
