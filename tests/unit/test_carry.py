"""Carried consume messages (fetched beyond what one answer holds) expire before their ack wait."""

from __future__ import annotations

from types import SimpleNamespace

from gateway.broker.consume import take_carried
from gateway.broker.routes import Group


def test_carried_messages_older_than_the_ack_wait_margin_are_dropped_not_handed_out() -> None:
    group = Group(consumer=SimpleNamespace(max_ack_time_ms=10_000), subscriptions=[])
    now = 1000.0
    group.carry = [(now - 9.5, "stale-1"), (now - 8.5, "stale-2"), (now - 7.0, "fresh-1"), (now - 0.1, "fresh-2"),
                   (now, "fresh-3")]
    taken = take_carried(group, 2, now)
    print(f"\ncarried 5 (ages 9.5, 8.5, 7, 0.1, 0 s; ack wait 10 s): handed out {[m for _, m in taken]}, "
          f"left {[m for _, m in group.carry]}")
    assert [m for _, m in taken] == ["fresh-1", "fresh-2"]
    assert [m for _, m in group.carry] == ["fresh-3"]
    assert take_carried(group, 5, now + 9) == []  # fresh-3 too old by then
