"""Ack ids of explicit-acknowledgement consumes: opaque to clients, verified when they come back.

An ack id is the JetStream reply subject of one delivery (what an ack is published to),
base64url-encoded, with an HMAC-SHA256 tag (truncated to 128 bits) under a key derived from
the shared secret, so any replica accepts the ids another handed out and nobody can forge
one. A valid tag alone is not trusted either: the subject must still be a JetStream ack
subject of the station named in the ack request, of visible-ASCII tokens only (a subject
with spaces, tabs or CR/LF would inject NATS protocol commands).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

from gateway.core.names import internal_name

_TAG_BYTES = 16
# $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or with <domain>.<account hash>
# before <stream> and a random token after; tokens are visible ASCII without '.', '*' or '>'.
_SUBJECT = re.compile(r"\$JS\.ACK(?:\.[!-)+-\-/-=?-~]+){7,11}")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class AckIds:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _tag(self, subject: bytes) -> bytes:
        return hmac.new(self._key, subject, hashlib.sha256).digest()[:_TAG_BYTES]

    def seal(self, reply_subject: str) -> str:
        raw = reply_subject.encode()
        return f"{_b64(raw)}.{_b64(self._tag(raw))}"

    def open(self, ack_id: str, station: str) -> str | None:
        """The reply subject of ``ack_id`` if it is genuine and belongs to ``station``, else None."""
        body, dot, tag = ack_id.partition(".")
        if not dot or len(ack_id) > 1024:
            return None
        try:
            raw, given = _unb64(body), _unb64(tag)
        except ValueError:
            return None
        if not hmac.compare_digest(given, self._tag(raw)):
            return None
        try:
            subject = raw.decode("ascii")
        except UnicodeDecodeError:
            return None
        if not _SUBJECT.fullmatch(subject):
            return None
        tokens = subject.split(".")
        key = internal_name(station)
        streams = tokens[2:3] if len(tokens) == 9 else tokens[4:5]
        if not streams or not (streams[0] == key or streams[0].startswith(f"{key}$")):
            return None
        return subject
