"""An in-memory ``Broker`` for servicer unit tests: what the servicers asked of the broker, and canned answers.

Every behaviour that reaches a real broker is also tested against a real nats-server
(tests/integration); this fake only isolates the servicers' own logic.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from gateway.broker.seam import ConsumerSpec, InMessage, OutMessage
from gateway.core.errors import Unauthenticated
from gateway.core.identity import Credentials


@dataclass
class FakeBroker:
    passwords: dict[str, str] = field(default_factory=lambda: {"root": "pw"})
    stored: dict[str, list[OutMessage]] = field(default_factory=lambda: defaultdict(list))
    refuse: dict[bytes, str] = field(default_factory=dict)  # payload -> the broker's refusal
    fetched: list[tuple[ConsumerSpec, int, float]] = field(default_factory=list)
    acked: list[tuple[str, tuple[str, ...], bool]] = field(default_factory=list)
    down: str | None = None

    async def open_session(self, creds: Credentials) -> Credentials:
        if self.passwords.get(creds.username) != creds.password:
            raise Unauthenticated("bad password")
        return creds

    async def produce(self, creds: Credentials, station: str, messages: Sequence[OutMessage],
                      producer_name: str = "") -> list[str | None]:
        errors: list[str | None] = []
        for m in messages:
            why = self.refuse.get(m.data)
            if why is None:
                self.stored[station].append(m)
            errors.append(why)
        return errors

    async def fetch(self, creds: Credentials, spec: ConsumerSpec, batch_size: int, max_wait_s: float
                    ) -> list[InMessage]:
        self.fetched.append((spec, batch_size, max_wait_s))
        taken = self.stored[spec.station][:batch_size]
        del self.stored[spec.station][:batch_size]
        return [InMessage(data=m.data, headers=dict(m.headers.items),
                          ack_id=f"ack-{i}" if spec.explicit_ack else None) for i, m in enumerate(taken)]

    async def subscribe(self, creds: Credentials, spec: ConsumerSpec, batch_size: int
                        ) -> AsyncIterator[list[InMessage]]:
        while batch := await self.fetch(creds, spec, batch_size, 0):
            yield batch

    async def ack(self, creds: Credentials, station: str, ack_ids: Sequence[str], nack: bool) -> int:
        self.acked.append((station, tuple(ack_ids), nack))
        return sum(1 for a in ack_ids if a.startswith("ack-"))

    async def health(self) -> str | None:
        return self.down

    async def storage_bytes(self, creds: Credentials) -> int:
        return sum(len(m.data) for ms in self.stored.values() for m in ms)

    async def close(self) -> None:
        return None
