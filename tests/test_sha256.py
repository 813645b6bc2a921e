"""appliance/sha256.py: CPython's own SHA-256 and an HMAC on it give hashlib's and hmac's answers."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from appliance import sha256 as ours


@pytest.mark.parametrize("key, msg", [
    (b"\x0b" * 20, b"Hi There"),  # RFC 4231 test case 1
    (b"Jefe", b"what do ya want for nothing?"),
    (b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First"),
    (b"", b""),
    (b"k" * 64, b"m" * 100000),
])
def test_our_sha256_and_hmac_are_hashlibs(key, msg):
    assert ours.hmac_sha256(key, msg) == hmac.new(key, msg, hashlib.sha256).digest()
    assert ours.sha256(msg).hexdigest() == hashlib.sha256(msg).hexdigest()
    h = ours.sha256()
    h.update(key)
    h.update(msg)
    assert h.hexdigest() == hashlib.sha256(key + msg).hexdigest()
    big = msg * (ours.LARGE // max(len(msg), 1) + 1)
    assert ours.sha256(big).hexdigest() == hashlib.sha256(big).hexdigest()
