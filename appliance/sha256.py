"""SHA-256 and HMAC-SHA256 without OpenSSL for what long-lived processes hash: short strings.

`import hashlib` (and `import hmac`) maps OpenSSL's libcrypto into the process: ~4 MB of
resident memory for as long as it lives. A runner hashes a few short strings per job (cache
and directory names, a venv's key, S3 request signatures); CPython's own SHA-256 does those as
fast. Inputs from LARGE bytes on go to hashlib, which is several times faster on them.
"""

from __future__ import annotations

try:
    from _sha256 import sha256 as _builtin  # CPython 3.11
except ImportError:  # pragma: no cover - other Pythons
    try:
        from _sha2 import sha256 as _builtin  # CPython 3.12+
    except ImportError:
        _builtin = None

LARGE = 1 << 20
_BLOCK = 64
_OUTER = bytes(x ^ 0x5C for x in range(256))
_INNER = bytes(x ^ 0x36 for x in range(256))


def sha256(data: bytes = b""):
    """A sha256 hash object (update, digest, hexdigest), as hashlib.sha256(data) makes."""
    if _builtin is None or len(data) >= LARGE:
        import hashlib

        return hashlib.sha256(data)
    return _builtin(data)


def hmac_sha256(key: bytes, msg: bytes) -> bytes:
    """HMAC-SHA256 (RFC 2104), as hmac.new(key, msg, hashlib.sha256).digest()."""
    if len(key) > _BLOCK:
        key = sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    inner = sha256(key.translate(_INNER))
    inner.update(msg)
    outer = sha256(key.translate(_OUTER))
    outer.update(inner.digest())
    return outer.digest()
