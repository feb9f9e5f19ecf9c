"""Who is speaking in a swarm: Ed25519 keys, signed envelopes, and the swarm secret as an HMAC key.

- A blockserver's id is derived from its public key, so no other key can speak for that id.
- A heartbeat is a signed envelope: a JSON payload (the record, a purpose and a time stamp), the
  signer's public key and its signature over the payload's exact bytes. A gateway takes each
  server's time stamps only in increasing order and only within MAX_SKEW_S of its own clock, so a
  captured heartbeat cannot be replayed.
- The swarm secret never crosses the network: a member proves it knows it with an HMAC of the
  payload under a key derived from it.
- A gateway signs session grants with its own key; blockservers learn the keys of the gateways
  they heartbeat to from the heartbeats' answers and serve only sessions granted by one of them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MAX_SKEW_S = 60.0  # clocks of a swarm's machines must agree within this (NTP does far better)
HEARTBEAT = "heartbeat"  # envelope purposes
GRANT = "grant"
STATELESS = "*"  # a grant's session for forward and backward passes
TOKEN_HEADER = "X-Corolla-Swarm-Token"  # "TIME:HMAC" on registry reads, when the swarm has a secret
MAX_PAYLOAD_BYTES = 64 * 1024


class AuthError(ValueError):
    """An envelope that does not verify: what is wrong, for the log and the 403."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_id(public_key: bytes, prefix: str = "bs") -> str:
    """An id that names one public key: `prefix`- and 20 base32 characters of its SHA-256 (100 bits)."""
    digest = base64.b32encode(hashlib.sha256(public_key).digest()).decode().lower()
    return f"{prefix}-{digest[:20]}"


class Identity:
    """A key pair. `path`: load it from there, or create it there (0600), so that a server keeps its
    id across restarts; None: a fresh key for this process."""

    def __init__(self, private: Ed25519PrivateKey, prefix: str = "bs"):
        self._private = private
        self.public_bytes = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                              serialization.PublicFormat.Raw)
        self.public_key = _b64(self.public_bytes)
        self.id = key_id(self.public_bytes, prefix)

    @classmethod
    def generate(cls, prefix: str = "bs") -> Identity:
        return cls(Ed25519PrivateKey.generate(), prefix)

    @classmethod
    def load_or_create(cls, path: str | Path | None, prefix: str = "bs") -> Identity:
        if path is None:
            return cls.generate(prefix)
        path = Path(path).expanduser()
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} does not hold an Ed25519 private key")
            return cls(key, prefix)
        identity = cls.generate(prefix)
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = identity._private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())
        path.touch(mode=0o600)
        path.write_bytes(pem)
        return identity

    def sign(self, purpose: str, body: dict, secret: str | None = None, now: float | None = None) -> dict:
        """An envelope carrying `body` for `purpose`, time-stamped, signed, and with the secret's
        HMAC when the swarm has one."""
        payload = json.dumps({"purpose": purpose, "time": time.time() if now is None else now, "body": body},
                             separators=(",", ":"), sort_keys=True)
        envelope = {"payload": payload, "public_key": self.public_key,
                    "signature": _b64(self._private.sign(payload.encode()))}
        if secret:
            envelope["token"] = secret_token(secret, payload)
        return envelope


def _secret_key(secret: str) -> bytes:
    return hashlib.sha256(b"corolla swarm secret v1\0" + secret.encode()).digest()


def secret_token(secret: str, message: str) -> str:
    """Proof of knowing the swarm secret, bound to `message` (useless for any other)."""
    return hmac.new(_secret_key(secret), message.encode(), hashlib.sha256).hexdigest()


def check_secret_token(secret: str | None, message: str, token: str | None) -> None:
    if secret and not (isinstance(token, str) and hmac.compare_digest(token, secret_token(secret, message))):
        raise AuthError("this swarm needs its join secret (blockserver --swarm-secret)")


def read_token(secret: str | None) -> dict[str, str]:
    """The header a registry read carries: proof of the secret, fresh (none without a secret)."""
    if not secret:
        return {}
    stamp = f"{time.time():.3f}"
    return {TOKEN_HEADER: f"{stamp}:{secret_token(secret, f'servers {stamp}')}"}


def check_read_token(secret: str | None, token: str | None, now: float | None = None) -> None:
    if not secret:
        return
    stamp, _, mac = (token or "").partition(":")
    try:
        fresh = abs((time.time() if now is None else now) - float(stamp)) <= MAX_SKEW_S
    except ValueError:
        fresh = False
    if not fresh or not hmac.compare_digest(mac, secret_token(secret, f"servers {stamp}")):
        raise AuthError("this swarm needs its join secret (blockserver --swarm-secret)")


@dataclass(frozen=True)
class Signed:
    """A verified envelope: who signed it (public key and the id derived from it), when, and what."""

    signer: str  # the id derived from the public key
    public_key: str
    time: float
    body: dict


def verify(envelope: object, purpose: str, secret: str | None = None, now: float | None = None,
           prefix: str = "bs", trusted: set[str] | None = None) -> Signed:
    """Check an envelope's shape, signature, purpose, time (within MAX_SKEW_S) and, when the swarm
    has a secret, its token. `trusted`: only these public keys may have signed it."""
    if not isinstance(envelope, dict):
        raise AuthError("expected a signed envelope {payload, public_key, signature}")
    payload, public_key, signature = (envelope.get(k) for k in ("payload", "public_key", "signature"))
    if not all(isinstance(v, str) for v in (payload, public_key, signature)):
        raise AuthError("expected a signed envelope {payload, public_key, signature}")
    if len(payload) > MAX_PAYLOAD_BYTES or len(public_key) > 64 or len(signature) > 128:
        raise AuthError("envelope too large")
    if trusted is not None and public_key not in trusted:
        raise AuthError("signed by a key that is not trusted here")
    check_secret_token(secret, payload, envelope.get("token"))
    try:
        key_bytes = _unb64(public_key)
        Ed25519PublicKey.from_public_bytes(key_bytes).verify(_unb64(signature), payload.encode())
        content = json.loads(payload)
    except (InvalidSignature, ValueError, TypeError):
        raise AuthError("bad signature") from None
    if not isinstance(content, dict) or content.get("purpose") != purpose or not isinstance(content.get("body"), dict):
        raise AuthError(f"not a {purpose} envelope")
    stamp = content.get("time")
    if not isinstance(stamp, int | float) or isinstance(stamp, bool):
        raise AuthError("no time stamp")
    now = time.time() if now is None else now
    if abs(now - stamp) > MAX_SKEW_S:
        raise AuthError(f"time stamp {now - stamp:+.0f}s away from this machine's clock (more than "
                        f"{MAX_SKEW_S:.0f}s: replayed, or the clocks disagree)")
    return Signed(key_id(key_bytes, prefix), public_key, float(stamp), content["body"])
