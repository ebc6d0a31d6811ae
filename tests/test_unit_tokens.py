"""Unit: bearer credentials (streaming.web.tokens): API keys and JWTs, the edge cases of §2.

JWKS keys come from a real local HTTP server (tests/jwks_server.py) that counts
its fetches, so the refetch bound is shown on the wire.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest

from config.settings import SettingsError, load_settings
from streaming.web.tokens import Credentials, InvalidCredential
from tests.jwks_server import AUDIENCE, ISSUER, JwksServer, Signer, hs256

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

SECRET = "s" * 32


def credentials(**env: str) -> Credentials:
    return Credentials(load_settings({"APP_ENV": "test", **env}))


@pytest.fixture(scope="module")
def rsa_key() -> Signer:
    return Signer("RS256", "rsa-1")


@pytest.fixture(scope="module")
def ec_key() -> Signer:
    return Signer("ES256", "ec-1")


def refused(creds: Credentials, token: str) -> str:
    with pytest.raises(InvalidCredential) as info:
        creds.verify(token)
    return str(info.value).lower()


def test_api_keys_and_their_owner():
    creds = credentials(API_KEYS="key-one,key-two")
    one, two = creds.verify("key-one"), creds.verify("key-two")
    assert one.kind == "key" and one.owner.startswith("key:") and "key-one" not in one.owner
    assert one.owner != two.owner and one.expires is None
    for wrong in ("key-on", "key-one ", "key-one,key-two", "a.b.c"):
        refused(creds, wrong)


def test_hs256_owner_is_sub_with_issuer():
    creds = credentials(JWT_SECRET=SECRET)
    alice = creds.verify(hs256(SECRET))
    assert alice.kind == "jwt" and alice.owner.startswith("jwt:")
    assert creds.verify(hs256(SECRET)).owner == alice.owner  # stable across tokens
    assert creds.verify(hs256(SECRET, sub="bob")).owner != alice.owner
    # the same sub from another issuer is someone else
    assert creds.verify(hs256(SECRET, iss="https://other.example")).owner != alice.owner
    assert "alice" not in alice.owner


def test_expiry_and_not_before_with_30_s_leeway():
    creds = credentials(JWT_SECRET=SECRET)
    now = int(time.time())
    assert creds.verify(hs256(SECRET, exp=now - 20)).expires == now - 20  # inside the leeway
    assert "expired" in refused(creds, hs256(SECRET, exp=now - 40))
    creds.verify(hs256(SECRET, nbf=now + 20))
    assert "not yet valid" in refused(creds, hs256(SECRET, nbf=now + 40))
    assert "exp" in refused(creds, hs256(SECRET, exp=None))  # exp is required
    assert "sub" in refused(creds, hs256(SECRET, sub=None))
    refused(creds, hs256(SECRET, sub=""))
    refused(creds, hs256("another-secret-of-enough-length!"))


def test_issuer_and_audience_are_required_when_set():
    creds = credentials(JWT_SECRET=SECRET, JWT_ISSUER=ISSUER, JWT_AUDIENCE=AUDIENCE)
    creds.verify(hs256(SECRET, iss=ISSUER, aud=AUDIENCE))
    creds.verify(hs256(SECRET, iss=ISSUER, aud=[AUDIENCE, "other"]))
    assert "issuer" in refused(creds, hs256(SECRET, iss="https://evil.example", aud=AUDIENCE))
    assert "audience" in refused(creds, hs256(SECRET, iss=ISSUER, aud="other"))
    assert "iss" in refused(creds, hs256(SECRET, aud=AUDIENCE))
    assert "aud" in refused(creds, hs256(SECRET, iss=ISSUER))


def _unsigned(claims: dict, header: dict) -> str:
    def b64(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{b64(header)}.{b64(claims)}."


def test_alg_none_is_refused(rsa_key):
    claims = {"sub": "alice", "exp": int(time.time()) + 300}
    for creds in (credentials(JWT_SECRET=SECRET), credentials(JWT_JWKS_URL="http://127.0.0.1:9/")):
        for alg in ("none", "None", "NONE"):
            token = _unsigned(claims, {"alg": alg, "typ": "JWT", "kid": rsa_key.kid})
            assert "not accepted" in refused(creds, token)


def test_algorithm_confusion_is_refused(rsa_key):
    """HS256 signed with the RSA public key (as PEM): never checked against that key."""
    with JwksServer(rsa_key) as jwks:
        pem = rsa_key.public_pem
        claims = {"sub": "alice", "exp": int(time.time()) + 300, "iss": ISSUER, "aud": AUDIENCE}
        # PyJWT itself refuses to HMAC with a PEM key, so the token is made by hand
        header = {"alg": "HS256", "typ": "JWT", "kid": rsa_key.kid}
        unsigned = _unsigned(claims, header)[:-1]
        signature = hmac.new(pem, unsigned.encode(), hashlib.sha256).digest()
        token = unsigned + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
        only_jwks = credentials(JWT_JWKS_URL=jwks.url)
        assert "not accepted" in refused(only_jwks, token)
        both = credentials(JWT_JWKS_URL=jwks.url, JWT_SECRET=SECRET)
        assert "signature" in refused(both, token)
        # and an RS256 header over an EC key's kid (or the reverse) is refused too
        assert jwks.fetches == 0  # refused before any key was fetched
        forged = jwt.encode(claims, rsa_key.private, algorithm="RS256", headers={"kid": "x"})
        refused(only_jwks, forged)


def test_rs256_and_es256_from_the_jwks_cached(rsa_key, ec_key):
    with JwksServer(rsa_key, ec_key) as jwks:
        creds = credentials(JWT_JWKS_URL=jwks.url, JWT_ISSUER=ISSUER, JWT_AUDIENCE=AUDIENCE)
        rs = creds.verify(rsa_key.token())
        es = creds.verify(ec_key.token(sub="bob"))
        assert rs.kind == es.kind == "jwt" and rs.owner != es.owner
        for _ in range(20):
            creds.verify(rsa_key.token())
        assert jwks.fetches == 1  # one fetch, then the cache
        # a key of the wrong type for the algorithm: the EC kid in an RS256 token
        assert "does not match" in refused(creds, rsa_key.token(kid=ec_key.kid))


def test_unknown_kid_refetches_at_most_once_per_cooldown(rsa_key):
    rotated = Signer("RS256", "rsa-2")
    with JwksServer(rsa_key) as jwks:
        creds = credentials(JWT_JWKS_URL=jwks.url)
        creds.verify(rsa_key.token())
        assert jwks.fetches == 1
        # a flood of unknown kids within the 30 s cooldown: no fetch at all
        for n in range(50):
            refused(creds, rsa_key.token(kid=f"guess-{n}"))
        assert jwks.fetches == 1
        # the identity provider rotates its key; once the cooldown has passed (shortened
        # here through PyJWKClient's own cooldown_duration), the new kid refetches once
        jwks.publish(rsa_key, rotated)
        assert creds.jwks.cooldown_duration == 30
        creds.jwks.cooldown_duration = 0
        assert creds.verify(rotated.token()).kind == "jwt"
        assert jwks.fetches == 2
        creds.jwks.cooldown_duration = 30  # and right after that fetch, the bound holds again
        for n in range(50):
            refused(creds, rsa_key.token(kid=f"again-{n}"))
        assert jwks.fetches == 2
        creds.verify(rotated.token())
        creds.verify(rsa_key.token())
        assert jwks.fetches == 2


def test_an_unreachable_jwks_is_a_refusal_not_a_crash(rsa_key):
    creds = credentials(JWT_JWKS_URL="http://127.0.0.1:9/jwks.json")
    assert "could not be fetched" in refused(creds, rsa_key.token())


def test_keys_and_jwts_at_once(rsa_key):
    with JwksServer(rsa_key) as jwks:
        creds = credentials(API_KEYS="key-one", JWT_SECRET=SECRET, JWT_JWKS_URL=jwks.url)
        assert creds.verify("key-one").kind == "key"
        assert creds.verify(hs256(SECRET)).kind == "jwt"
        assert creds.verify(rsa_key.token()).kind == "jwt"
        refused(creds, "not-a-key")


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"JWT_SECRET": "too-short"}, "JWT_SECRET"),
        ({"JWT_JWKS_URL": "file:///etc/passwd"}, "JWT_JWKS_URL"),
        ({"RATE_LIMIT_AUTH_FAILURES": "often"}, "RATE_LIMIT_AUTH_FAILURES"),
    ],
)
def test_bad_identity_settings_name_the_variable(env, name):
    with pytest.raises(SettingsError, match=name):
        load_settings({"APP_ENV": "test", **env})


@pytest.mark.parametrize(
    "origins", ["chat.example.com", "https://chat.example.com/", "https://a/b"]
)
def test_cors_origins_are_origins(origins):
    with pytest.raises(SettingsError, match="CORS_ORIGINS"):
        load_settings({"APP_ENV": "test", "CORS_ORIGINS": origins})
