"""A throwaway RSA key for tests: a JWKS for Envoy's jwt_authn and tokens signed with it."""

from __future__ import annotations

import json
import time
from functools import lru_cache

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa


@lru_cache(maxsize=1)
def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwks_json() -> str:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(_key().public_key()))
    jwk.update({"kid": "test", "alg": "RS256", "use": "sig"})
    return json.dumps({"keys": [jwk]})


def token(sub: str, team: str, **claims: object) -> str:
    payload = {"sub": sub, "team": team, "iss": "tests", "iat": int(time.time()), "exp": int(time.time()) + 3600, **claims}
    return jwt.encode(payload, _key(), algorithm="RS256", headers={"kid": "test"})
