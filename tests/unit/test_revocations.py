"""Pure logic of revocations (web/revocations.py) and the hub's client index (web/hub/__init__.py):
the checks a web process makes from its copy, with no round trip."""

from __future__ import annotations

import types

from web.auth import Identity
from web.hub import Clients
from web.revocations import Revocations


def copy() -> Revocations:
    # Checks and applies read no store: a settings holder is all it needs.
    return Revocations(types.SimpleNamespace(settings=types.SimpleNamespace(revocation_ttl=3600)))


def test_a_token_id_is_revoked_until_its_revocation_lapses():
    revocations = copy()
    token = Identity("alice", jti="j1", issued=100.0)
    assert not revocations.revoked(token)
    revocations.apply_token("j1", 2000.0)
    assert revocations.revoked(token, now=1999.0)
    assert not revocations.revoked(token, now=2000.5)
    assert not revocations.revoked(Identity("alice", jti="j2", issued=100.0), now=1000.0)


def test_a_users_cut_off_revokes_tokens_issued_before_it_and_only_moves_forward():
    revocations = copy()
    revocations.apply_user("alice", 200.0)
    assert revocations.revoked(Identity("alice", jti="a", issued=199.5))
    assert not revocations.revoked(Identity("alice", jti="b", issued=200.0))
    assert not revocations.revoked(Identity("bob", jti="c", issued=1.0))
    revocations.apply_user("alice", 50.0)
    assert revocations.revoked(Identity("alice", jti="a", issued=199.5))


def test_a_token_without_iat_escapes_a_cut_off_and_one_without_jti_is_caught_by_it():
    revocations = copy()
    revocations.apply_user("alice", 200.0)
    assert not revocations.revoked(Identity("alice"))
    assert revocations.revoked(Identity("alice", issued=10.0))


def client(client_id: str, user: str, jti: str | None):
    return types.SimpleNamespace(id=client_id, identity=Identity(user, jti=jti))


def test_the_client_index_follows_adds_and_removes():
    clients = Clients()
    a1, a2, b1 = client("1", "alice", "t1"), client("2", "alice", None), client("3", "bob", "t1")
    for one in (a1, a2, b1):
        clients[one.id] = one
    assert clients.of_user("alice") == [a1, a2] and clients.of_token("t1") == [a1, b1]
    assert clients.pop("1") is a1 and clients.pop("1") is None and clients.pop("9", "none") == "none"
    assert clients.of_user("alice") == [a2] and clients.of_token("t1") == [b1]
    clients.pop("2")
    clients.pop("3")
    assert clients.of_user("alice") == [] and clients.of_token("t1") == [] and not clients
    assert clients._users == {} and clients._tokens == {}


def test_a_token_outliving_its_revocation_or_with_an_unnameable_user_is_refused():
    import time

    import pytest

    from pipeline.core.settings import Settings
    from web.auth import MAX_USER, AuthError, mint, verify

    settings = Settings.from_env({"HERALD_SECRET_KEY": "k" * 40, "HERALD_REVOCATION_TTL": "3600"})
    assert verify(mint(settings, "u", ttl=3600), settings).user == "u"
    # A revocation is kept an hour: a token of a day would be usable again after it lapsed.
    with pytest.raises(AuthError, match="HERALD_REVOCATION_TTL"):
        verify(mint(settings, "u", ttl=86400), settings)
    # A user the server API cannot name could be neither disconnected nor revoked by user.
    with pytest.raises(AuthError, match="sub must be"):
        verify(mint(settings, "u" * (MAX_USER + 1)), settings)
    assert verify(mint(settings, "u" * MAX_USER), settings).expires > time.time()
