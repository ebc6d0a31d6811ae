"""Bearer credentials: API keys and JWTs (API.md section 2), checked without Flask.

`Credentials.verify(token)` answers the `Identity` a bearer value stands for,
or raises `InvalidCredential`:

- API keys (``API_KEYS``): compared in constant time against every key; the
  owner is ``key:<digest>`` (the key itself is never stored or logged).
- JWTs (``JWT_SECRET`` and/or ``JWT_JWKS_URL``), verified by PyJWT:
  HS256 with the secret, RS256/ES256 with the key of the token's ``kid`` from
  the JWKS (PyJWT's `PyJWKClient`: the set is cached for 5 minutes, and an
  unknown ``kid`` refetches it at most once every 30 s, its
  ``cooldown_duration``; per worker process). The algorithm is decided by
  configuration, never by the token: ``alg: none`` is refused, an HS256 token
  is only ever checked with ``JWT_SECRET`` (so one signed with the RSA public
  key fails), and an RS256/ES256 token only with a JWKS key of that type.
  ``exp`` and ``sub`` are required, ``exp``/``nbf``/``iat`` get 30 s of leeway,
  ``iss``/``aud`` are required and must match when ``JWT_ISSUER`` /
  ``JWT_AUDIENCE`` are set. The owner is ``jwt:<digest of issuer and sub>``.

A bearer value that equals an API key is a key; otherwise, with JWT on and the
shape of a JWT (three dot-separated parts), a JWT.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass

import jwt
from jwt import PyJWKClient

from config.settings import Settings

__all__ = ["Credentials", "Identity", "InvalidCredential", "LEEWAY_SECONDS"]

logger = logging.getLogger(__name__)

LEEWAY_SECONDS = 30
JWKS_COOLDOWN_SECONDS = 30  # an unknown kid refetches the JWKS at most this often
JWKS_LIFESPAN_SECONDS = 300
JWKS_TIMEOUT_SECONDS = 5
ASYMMETRIC = {"RS256": "RSA", "ES256": "EC"}  # alg -> the JWK key type it needs


class InvalidCredential(Exception):
    """The bearer value is no valid credential (the message says why, without the value)."""


@dataclass(frozen=True)
class Identity:
    owner: str  # "key:<digest>" or "jwt:<digest>"
    kind: str  # "key" or "jwt"
    expires: float | None = None  # a JWT's exp (epoch seconds); None for a key


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


class Credentials:
    """The credentials one app accepts (built once per app from its settings)."""

    def __init__(self, settings: Settings):
        self.keys = tuple(key.encode() for key in settings.api_keys)
        self.secret = settings.jwt_secret
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience
        self.jwks = (
            PyJWKClient(
                settings.jwt_jwks_url,
                cache_jwk_set=True,
                lifespan=JWKS_LIFESPAN_SECONDS,
                timeout=JWKS_TIMEOUT_SECONDS,
                cooldown_duration=JWKS_COOLDOWN_SECONDS,
            )
            if settings.jwt_jwks_url
            else None
        )

    @property
    def jwt_enabled(self) -> bool:
        return bool(self.secret or self.jwks)

    def verify(self, token: str) -> Identity:
        given = token.encode()
        matched = False
        for candidate in self.keys:  # every key, constant time: no early exit
            matched |= hmac.compare_digest(given, candidate)
        if matched:
            return Identity("key:" + hashlib.sha256(given).hexdigest()[:24], "key")
        if self.jwt_enabled and token.count(".") == 2:
            return self._verify_jwt(token)
        raise InvalidCredential("not a valid key")

    def _verify_jwt(self, token: str) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as err:
            raise InvalidCredential(f"malformed token: {err}") from None
        alg = header.get("alg")
        if alg == "HS256" and self.secret:
            key: object = self.secret
        elif alg in ASYMMETRIC and self.jwks is not None:
            key = self._jwks_key(header.get("kid"), alg)
        else:  # "none", HS256 without a secret, anything else: refused before any check
            raise InvalidCredential(f"algorithm {str(alg)[:16]!r} not accepted")
        required = ["exp", "sub"]
        if self.issuer:
            required.append("iss")
        if self.audience:
            required.append("aud")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                issuer=self.issuer,
                audience=self.audience,
                leeway=LEEWAY_SECONDS,
                options={"require": required, "verify_aud": bool(self.audience)},
            )
        except jwt.PyJWTError as err:
            raise InvalidCredential(f"token refused: {err}") from None
        subject, issuer = claims.get("sub"), claims.get("iss", "")
        if not isinstance(subject, str) or not subject or not isinstance(issuer, str):
            raise InvalidCredential("token refused: sub must be a non-empty string")
        return Identity("jwt:" + _digest(issuer, subject), "jwt", float(claims["exp"]))

    def _jwks_key(self, kid: object, alg: str) -> object:
        if not isinstance(kid, str) or not kid:
            raise InvalidCredential("token refused: no kid")
        try:
            jwk = self.jwks.get_signing_key(kid)
        except jwt.PyJWKClientConnectionError as err:
            logger.warning("JWKS unavailable: %s", err)
            raise InvalidCredential("the signing keys could not be fetched") from None
        except jwt.PyJWTError:
            raise InvalidCredential("token refused: unknown kid") from None
        if jwk.key_type != ASYMMETRIC[alg] or jwk.algorithm_name != alg:
            raise InvalidCredential("token refused: the key does not match the algorithm")
        return jwk
