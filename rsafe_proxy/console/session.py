"""The console's session cookie: who is signed in, until when, and the nonce its CSRF token is bound to, signed
with HMAC-SHA256. Pure: it knows no HTTP framework.

A cookie carries no key, only a fingerprint of the signing key's digest (HMAC under the session secret): a
session stays valid only while that key is still configured, so removing or rotating a key signs its holders
out. Every visitor gets a session, signed in or not, so that the sign-in form itself has a CSRF token."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from rsafe_proxy.console.keys import Viewer

COOKIE = "rsafe_console"
_ANONYMOUS_TTL_S = 3600.0  # a sign-in form's session: long enough to find the key


@dataclass(frozen=True, slots=True)
class Session:
    """One browser's session: `viewer` None until a key is accepted; `key` is the fingerprint of that key."""

    viewer: Viewer | None
    nonce: str
    expires: float
    key: str = ""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionSigner:
    """Issues and reads signed session cookies and the CSRF tokens bound to them."""

    def __init__(self, secret: bytes, ttl_s: float) -> None:
        self._secret = hashlib.sha256(b"rsafe-console-session\0" + secret).digest()
        self.ttl_s = ttl_s

    def _mac(self, purpose: bytes, data: bytes) -> bytes:
        return hmac.new(self._secret, purpose + b"\0" + data, hashlib.sha256).digest()

    def fingerprint(self, digest: bytes) -> str:
        """What a cookie keeps of the key that signed in (the key's digest, under the secret)."""
        return _b64(self._mac(b"key", digest)[:16])

    def anonymous(self, now: float) -> Session:
        """A fresh session with no one signed in."""
        return Session(None, secrets.token_urlsafe(18), now + _ANONYMOUS_TTL_S)

    def signed_in(self, viewer: Viewer, digest: bytes, now: float) -> Session:
        """A fresh session (new nonce: nothing from before the sign-in carries over) for `viewer`."""
        return Session(viewer, secrets.token_urlsafe(18), now + self.ttl_s, self.fingerprint(digest))

    def cookie(self, session: Session) -> str:
        """The cookie's value: payload and signature, both base64url."""
        who = None if session.viewer is None else (session.viewer.tenant or "*")
        payload = json.dumps({"v": who, "n": session.nonce, "e": session.expires, "k": session.key})
        data = payload.encode()
        return f"{_b64(data)}.{_b64(self._mac(b'cookie', data))}"

    def read(self, value: str | None, now: float) -> Session | None:
        """The session in a cookie's value, or None when it is missing, forged, malformed or expired."""
        if not value or value.count(".") != 1:
            return None
        data_part, mac_part = value.split(".")
        try:
            data, mac = _unb64(data_part), _unb64(mac_part)
            if not hmac.compare_digest(mac, self._mac(b"cookie", data)):
                return None
            fields = json.loads(data)
        except (ValueError, binascii.Error):
            return None
        who, nonce, expires, key = fields.get("v"), fields.get("n"), fields.get("e"), fields.get("k")
        if not isinstance(nonce, str) or not isinstance(expires, float | int) or not isinstance(key, str):
            return None
        if expires <= now or not (who is None or isinstance(who, str)):
            return None
        viewer = None if who is None else Viewer(None if who == "*" else who)
        return Session(viewer, nonce, float(expires), key)

    def still_keyed(self, session: Session, digests: Sequence[bytes]) -> bool:
        """True when the key that signed `session` in is one of `digests` (the viewer's keys configured now)."""
        found = False
        for digest in digests:
            found |= hmac.compare_digest(self.fingerprint(digest), session.key)
        return found

    def csrf_token(self, session: Session) -> str:
        """The token every form of this session carries."""
        return _b64(self._mac(b"csrf", session.nonce.encode()))

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        """True when `token` is this session's CSRF token."""
        return token is not None and hmac.compare_digest(token.encode(), self.csrf_token(session).encode())
