"""Keys derived from the one shared secret (``jwt_secret``): one per purpose, never the secret itself.

Replicas that share the secret derive the same keys, so each accepts what another issued
(tokens, sealed credentials, ack ids) without any key being sent anywhere.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def derive_key(secret: str | bytes, purpose: str) -> bytes:
    """A 32-byte key for ``purpose`` (HKDF-SHA256)."""
    raw = secret.encode() if isinstance(secret, str) else secret
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"memphis-gateway " + purpose.encode()).derive(raw)
