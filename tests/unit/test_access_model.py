"""The authorization model: patterns, roles, a key narrowed to its scope, unmanaged directories."""

from __future__ import annotations

import pytest

from gateway.auth.access import Access, patterns
from gateway.auth.directory import Directory
from gateway.auth.tokens import TokenService
from gateway.core.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from gateway.core.identity import Credentials, Principal
from gateway.embedded.permissions import user_permissions


def test_patterns_match_lower_cased_station_names() -> None:
    app = Access(who="user bob", produce=patterns(["Orders", "web-*"], "p"), consume=patterns(["orders"], "c"))
    assert app.allows("produce", "orders") and app.allows("produce", "web-eu")
    assert not app.allows("produce", "webhooks") and not app.allows("consume", "web-eu")
    assert not app.allows("manage")
    with pytest.raises(PermissionDenied, match="user bob may not consume from station web-eu"):
        app.check("consume", "web-eu")
    with pytest.raises(PermissionDenied, match="user bob may not manage"):
        app.check("manage")


def test_a_key_is_never_wider_than_its_user() -> None:
    user = Access(who="user bob", produce=("orders",), consume=("orders",))
    key = user.narrowed("API key k", ("orders", "payments"), ("produce",))
    assert key.allows("produce", "orders")
    assert not key.allows("produce", "payments")  # the key names it, the user may not
    assert not key.allows("consume", "orders")  # the user may, the key does not
    admin_key = Access.everything("user root").narrowed("API key r", ("*",), ("produce", "consume"))
    assert admin_key.allows("consume", "anything") and not admin_key.allows("manage")


@pytest.mark.parametrize("bad", ["", "   ", "a b", "orders.>", "x" * 129, "ü"])
def test_bad_patterns_are_refused(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        patterns([bad], "permissions.produce")


async def test_an_unmanaged_directory_refuses_changes_and_lets_the_broker_decide() -> None:
    tokens = TokenService("s" * 40)
    directory = Directory(tokens, "root", managed=False)
    creds = Credentials(username="bob", account_id=1, password="x")
    with pytest.raises(FailedPrecondition, match="external Memphis broker"):
        await directory.create_key(creds, "k", ("*",), ("produce",), 0)
    with pytest.raises(FailedPrecondition):
        await directory.put_user("alice", "", "application", (), ())
    bob = directory.access_of(Principal(credentials=creds))
    assert bob.allows("produce", "any") and not bob.allows("manage")
    assert directory.access_of(Principal(credentials=Credentials(username="root", account_id=1))).allows("manage")


def test_broker_permissions_of_a_literal_station_and_of_every_station() -> None:
    perms = user_permissions(["orders"], ["orders"])
    assert "orders$1.final" in perms["publish"]["allow"] and "orders$16.final" in perms["publish"]["allow"]
    assert "$JS.API.CONSUMER.MSG.NEXT.orders$1.*" in perms["publish"]["allow"]
    # every control-plane request may be sent: the control plane answers it with the sender's rights
    assert "$memphis_station_destructions" in perms["publish"]["allow"]
    assert not [s for s in perms["publish"]["allow"] if s.startswith(("$JS.API.STREAM.DELETE", "$JS.API.CONSUMER.C"))]
    assert "*.final" in user_permissions(["*"], [])["publish"]["allow"]
    # a wildcard inside a name cannot be a NATS subject: nothing on the broker
    assert not [s for s in user_permissions(["web-*"], [])["publish"]["allow"] if "web" in s]
