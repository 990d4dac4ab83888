"""Bearer-token verification: the JWT attack matrix, key sources (HS256, RS256 PEM, ES256 JWKS) and minting."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import SecretStr
from pydantic import ValidationError as SettingsError

from broadcast.auth.jwks import JwksKeys
from broadcast.auth.tokens import InvalidToken, TokenVerifier, mint
from broadcast.core.settings import DEV_JWT_SECRET, AuthSettings, Settings

AUD, ISS = "broadcast-server", "broadcast-dev"
HS = AuthSettings()
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PUBLIC_PEM = (
    RSA_KEY.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)
RS = AuthSettings(algorithm="RS256", public_key=SecretStr(RSA_PUBLIC_PEM))
ATTACKER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ATTACKER_JWK = orjson.loads(jwt.algorithms.RSAAlgorithm.to_jwk(ATTACKER_KEY.public_key()))
ATTACKER_URL = "https://attacker.example/keys.json"
ATTACKER_CERT = "MIIBkTCB+wIJAKHHIG...attacker-cert"  # the shape of an x5c entry; never parsed


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "alice", "aud": AUD, "iss": ISS, "iat": now, "exp": now + 600, "roles": ["admin"]}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def hs(payload: dict[str, Any], headers: dict[str, Any] | None = None, secret: str = DEV_JWT_SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(payload: dict[str, Any]) -> str:
    return f"{b64(orjson.dumps({'alg': 'none', 'typ': 'JWT'}))}.{b64(orjson.dumps(payload))}."


def hs_with_rsa_public_key(payload: dict[str, Any]) -> str:
    """The classic confusion: HS256 "signed" with the RS256 verification key as the HMAC secret."""
    import hashlib
    import hmac

    head = b64(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
    body = b64(orjson.dumps(payload))
    signature = hmac.new(RSA_PUBLIC_PEM.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


# Each builds a token that must be refused by a verifier of the settings named first.
ATTACKS: dict[str, tuple[AuthSettings, Callable[[], str]]] = {
    "alg none": (HS, lambda: unsigned(claims())),
    "alg none on RS": (RS, lambda: unsigned(claims())),
    "HS256 signed with the RS public key": (RS, lambda: hs_with_rsa_public_key(claims())),
    "wrong secret": (HS, lambda: hs(claims(), secret="x" * 40)),
    "expired": (HS, lambda: hs(claims(exp=int(time.time()) - 120))),
    "no exp": (HS, lambda: hs(claims(exp=None))),
    "no sub": (HS, lambda: hs(claims(sub=None))),
    "empty sub": (HS, lambda: hs(claims(sub=""))),
    "wrong aud": (HS, lambda: hs(claims(aud="other-service"))),
    "missing aud": (HS, lambda: hs(claims(aud=None))),
    "missing iss": (HS, lambda: hs(claims(iss=None))),
    "iss with a matching prefix": (HS, lambda: hs(claims(iss=ISS + ".evil.example"))),
    "iss that is a prefix": (HS, lambda: hs(claims(iss=ISS[:-1]))),
    "future nbf": (HS, lambda: hs(claims(nbf=int(time.time()) + 3_600))),
    "future iat": (HS, lambda: hs(claims(iat=int(time.time()) + 3_600))),
    "aud as a list (exact match only)": (HS, lambda: hs(claims(aud=[AUD, "other"]))),
    "exp beyond year 9999": (HS, lambda: hs(claims(exp=10**12))),
    "exp a string": (HS, lambda: hs(claims(exp=str(int(time.time()) + 600)))),
    "iat not a number": (HS, lambda: hs(claims(iat="yesterday"))),
    "nbf a boolean": (HS, lambda: hs(claims(nbf=True))),
    "aud a list naming only this audience": (HS, lambda: hs(claims(aud=[AUD]))),
    "payload a JSON list": (HS, lambda: jwt.PyJWS().encode(b'["alice"]', DEV_JWT_SECRET, algorithm="HS256")),
    "payload not JSON": (HS, lambda: jwt.PyJWS().encode(b"alice", DEV_JWT_SECRET, algorithm="HS256")),
    "unknown kid": (HS, lambda: hs(claims(), headers={"kid": "some-other-key"})),
    "malformed base64": (HS, lambda: "eyJ!!!.eyJzdWIiOiJhIn0.c2ln"),
    "not a JWT": (HS, lambda: "hello"),
    "oversized header": (HS, lambda: hs(claims(), headers={"x": "a" * 10_000})),
    "32 KiB header": (HS, lambda: hs(claims(), headers={"x": "a" * 32_768})),
    # key-location headers: with the attacker's own key (the attack), and even with the server's real key
    "jku to the attacker's keys, signed by the attacker": (
        RS,
        lambda: jwt.encode(claims(), ATTACKER_KEY, algorithm="RS256", headers={"jku": ATTACKER_URL}),
    ),
    "jwk embedding the attacker's key, signed by the attacker": (
        RS,
        lambda: jwt.encode(claims(), ATTACKER_KEY, algorithm="RS256", headers={"jwk": ATTACKER_JWK}),
    ),
    "x5u to the attacker's certificate, signed by the attacker": (
        RS,
        lambda: jwt.encode(claims(), ATTACKER_KEY, algorithm="RS256", headers={"x5u": ATTACKER_URL}),
    ),
    "jku, signed with the server's key": (RS, lambda: jwt.encode(claims(), RSA_KEY, "RS256", {"jku": ATTACKER_URL})),
    "jwk, signed with the server's key": (RS, lambda: jwt.encode(claims(), RSA_KEY, "RS256", {"jwk": ATTACKER_JWK})),
    "x5u, signed with the server's key": (RS, lambda: jwt.encode(claims(), RSA_KEY, "RS256", {"x5u": ATTACKER_URL})),
    "x5c, signed with the server's key": (RS, lambda: jwt.encode(claims(), RSA_KEY, "RS256", {"x5c": [ATTACKER_CERT]})),
    "jku on HS256, signed with the secret": (HS, lambda: hs(claims(), headers={"jku": ATTACKER_URL})),
    "unknown crit, signed with the secret": (HS, lambda: hs(claims(), headers={"crit": ["exp-x"], "exp-x": 1})),
    "crit naming a missing header": (HS, lambda: hs(claims(), headers={"crit": ["exp-x"]})),
    "crit b64, signed with the secret": (HS, lambda: hs(claims(), headers={"crit": ["b64"], "b64": True})),
    "crit not a list": (HS, lambda: hs(claims(), headers={"crit": "exp-x"})),
    "roles not a list": (HS, lambda: hs(claims(roles={"admin": True}))),
    "an ID token (typ id_token+jwt)": (HS, lambda: hs(claims(), headers={"typ": "id_token+jwt"})),
    "a logout token (typ logout+jwt)": (HS, lambda: hs(claims(), headers={"typ": "application/logout+jwt"})),
    "typ not a string": (HS, lambda: hs(claims(), headers={"typ": ["JWT"]})),
    "no typ where it is required": (AuthSettings(require_typ=True), lambda: hs(claims(), headers={"typ": None})),
    "RS token with the wrong key": (
        RS,
        lambda: jwt.encode(claims(), rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256"),
    ),
}


@pytest.mark.parametrize("name", ATTACKS)
async def test_attack_is_refused(name: str) -> None:
    settings, build = ATTACKS[name]
    with pytest.raises(InvalidToken):
        await TokenVerifier(settings).verify(build())


async def test_a_good_token_gives_the_principal() -> None:
    who = await TokenVerifier(HS).verify(hs(claims(roles=["admin", "ops"])))
    assert (who.sub, who.roles) == ("alice", frozenset({"admin", "ops"}))
    assert who.expires_at > time.time()


@pytest.mark.parametrize("typ", ["JWT", "jwt", "at+jwt", "application/at+JWT", None])
async def test_an_access_token_type_or_none_is_accepted(typ: str | None) -> None:
    assert (await TokenVerifier(HS).verify(hs(claims(), headers={"typ": typ}))).sub == "alice"


async def test_roles_may_be_a_space_separated_string_and_absent() -> None:
    assert (await TokenVerifier(HS).verify(hs(claims(roles="ops admin")))).roles == {"ops", "admin"}
    assert (await TokenVerifier(HS).verify(hs(claims(roles=None)))).roles == frozenset()


async def test_rs256_with_a_pem_public_key() -> None:
    token = jwt.encode(claims(), RSA_KEY, algorithm="RS256")
    assert (await TokenVerifier(RS).verify(token)).sub == "alice"
    with pytest.raises(InvalidToken):  # the right signature, but HS256 is not the pinned algorithm
        await TokenVerifier(HS).verify(token)


async def test_a_configured_kid_is_required() -> None:
    settings = AuthSettings(key_id="k1")
    assert (await TokenVerifier(settings).verify(mint(settings, "bob"))).sub == "bob"
    with pytest.raises(InvalidToken):
        await TokenVerifier(settings).verify(hs(claims()))  # no kid
    with pytest.raises(InvalidToken):
        await TokenVerifier(settings).verify(hs(claims(), headers={"kid": "k2"}))


@contextlib.contextmanager
def serving(document: bytes) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1 answering every GET with the JSON ``document``; its base URL, and the path
    of every request it got."""
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(document)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()


@pytest.fixture
def jwks_server() -> Iterator[tuple[str, list[str]]]:
    """A JWKS endpoint on 127.0.0.1 serving an ES256 key (kid ``ec-1``) and an RSA key (kid ``rsa-1``);
    counts its fetches."""
    ec_jwk = orjson.loads(jwt.algorithms.ECAlgorithm.to_jwk(EC_KEY.public_key()))
    rsa_jwk = orjson.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key()))
    keys = [{**ec_jwk, "kid": "ec-1", "alg": "ES256", "use": "sig"}, {**rsa_jwk, "kid": "rsa-1", "use": "sig"}]
    document = orjson.dumps({"keys": keys})
    with serving(document) as (base, requests):
        yield f"{base}/jwks.json", requests


EC_KEY = ec.generate_private_key(ec.SECP256R1())


async def test_es256_keys_from_a_jwks_url(jwks_server: tuple[str, list[str]]) -> None:
    url, fetches = jwks_server
    settings = AuthSettings(algorithm="ES256", jwks_url=url)
    verifier = TokenVerifier(settings, JwksKeys(url, "ES256", min_refetch_seconds=60))
    good = jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "ec-1"})
    assert (await verifier.verify(good)).sub == "alice"
    for kid in ("ec-2", "ec-3", "ec-4"):  # unknown kids: refused, and they do not hammer the IdP
        with pytest.raises(InvalidToken):
            await verifier.verify(jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": kid}))
    with pytest.raises(InvalidToken):  # no kid with a JWKS
        await verifier.verify(jwt.encode(claims(), EC_KEY, algorithm="ES256"))
    with pytest.raises(InvalidToken):  # a key of another type: unknown here, never a TypeError (500)
        await verifier.verify(jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "rsa-1"}))
    assert len(fetches) == 1
    rs_settings = AuthSettings(algorithm="RS256", jwks_url=url)
    rs_verifier = TokenVerifier(rs_settings, JwksKeys(url, "RS256"))
    assert (await rs_verifier.verify(jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "rsa-1"}))).sub
    with pytest.raises(InvalidToken):
        await rs_verifier.verify(jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "ec-1"}))


@pytest.fixture
def attacker_url() -> Iterator[tuple[str, list[str]]]:
    """An attacker's server on 127.0.0.1 that would serve its own key set; records every request it gets."""
    document = orjson.dumps({"keys": [{**ATTACKER_JWK, "kid": "ec-1", "use": "sig"}]})
    with serving(document) as served:
        yield served


async def test_a_key_url_in_a_token_is_never_fetched(
    attacker_url: tuple[str, list[str]], jwks_server: tuple[str, list[str]]
) -> None:
    """jku/x5u pointing at a live server: refused by every key source, and the server is never asked."""
    base, requests = attacker_url
    jwks, jwks_fetches = jwks_server
    es = TokenVerifier(AuthSettings(algorithm="ES256", jwks_url=jwks), JwksKeys(jwks, "ES256", min_refetch_seconds=0))
    for name in ("jku", "x5u"):
        url = f"{base}/{name}.json"
        for verifier, token in (
            (TokenVerifier(HS), hs(claims(), headers={name: url})),
            (TokenVerifier(RS), jwt.encode(claims(), ATTACKER_KEY, "RS256", {name: url})),
            (TokenVerifier(RS), jwt.encode(claims(), RSA_KEY, "RS256", {name: url})),
            (es, jwt.encode(claims(), EC_KEY, "ES256", {"kid": "ec-1", name: url})),
        ):
            with pytest.raises(InvalidToken):
                await verifier.verify(token)
    await asyncio.sleep(0.2)  # a fetch in a thread would have arrived by now
    assert requests == [], "the server fetched a URL named by a token"
    assert (await es.verify(jwt.encode(claims(), EC_KEY, "ES256", {"kid": "ec-1"}))).sub == "alice"
    assert len(jwks_fetches) == 1, "only the configured JWKS URL is fetched"


def test_mint_round_trips_and_refuses_asymmetric_settings() -> None:
    token = mint(HS, "carol", ["ops"], ttl_seconds=60)
    payload = jwt.decode(token, DEV_JWT_SECRET, algorithms=["HS256"], audience=AUD)
    assert (payload["sub"], payload["roles"], payload["iss"]) == ("carol", ["ops"], ISS)
    assert 55 <= payload["exp"] - time.time() <= 61
    with pytest.raises(ValueError, match="HS256"):
        mint(RS, "carol")


def test_production_refuses_the_dev_secret_and_weak_keys() -> None:
    with pytest.raises(SettingsError, match="development JWT secret"):
        Settings(environment="production")
    with pytest.raises(SettingsError, match="at least 32 bytes"):
        AuthSettings(jwt_secret=SecretStr("short"))
    with pytest.raises(SettingsError, match="public_key"):
        AuthSettings(algorithm="RS256")
    with pytest.raises(SettingsError, match="https"):
        AuthSettings(algorithm="RS256", jwks_url="http://idp.example/jwks.json")
    assert (
        Settings(environment="production", auth=AuthSettings(jwt_secret=SecretStr("p" * 40))).auth.algorithm == "HS256"
    )


async def test_a_remembered_token_still_expires() -> None:
    settings = AuthSettings(leeway_seconds=0)
    verifier = TokenVerifier(settings)
    token = mint(settings, "dave", ttl_seconds=2)  # exp is 1-2 s away (iat is whole seconds)
    assert (await verifier.verify(token)).sub == "dave"
    assert (await verifier.verify(token)).sub == "dave"  # from the cache
    await asyncio.sleep(2.1)
    with pytest.raises(InvalidToken):
        await verifier.verify(token)


async def test_the_verified_token_cache_is_bounded() -> None:
    verifier = TokenVerifier(HS)
    verifier.CACHE_SIZE = 5
    for i in range(20):
        await verifier.verify(mint(HS, f"u{i}"))
    assert len(verifier._verified) == 5
