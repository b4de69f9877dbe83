"""Callers and costs: token names, client labels, token-forwards (no model, no server)."""

import hashlib

import pytest

from esmc_server.auth import TokenStore, named_token
from esmc_server.calls import ANONYMOUS, OTHER, Caller, CallerLabels, Cost

pytestmark = pytest.mark.unit


def test_named_token_lines_and_bare_tokens():
    assert named_token("alice:s3cret-token") == ("alice", "s3cret-token")
    digest = hashlib.sha256(b"bare-token").hexdigest()[:8]
    assert named_token("bare-token") == (f"token-{digest}", "bare-token")
    # a name that is not a name keeps the whole line as the token
    line = "not a name:tok"
    assert named_token(line) == ("token-" + hashlib.sha256(line.encode()).hexdigest()[:8], line)


def test_token_store_names_the_caller(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# team tokens\nalice:aaaa1111\nbbbb2222\n")
    store = TokenStore(path)
    assert len(store) == 2
    assert store.caller("Bearer aaaa1111") == Caller("alice")
    named = store.caller("Bearer bbbb2222")
    assert named.name.startswith("token-") and "bbbb" not in named.name
    assert store.caller("Bearer alice:aaaa1111") is None
    assert store.caller("Bearer nope") is None
    assert store.allows("Bearer aaaa1111") and not store.allows(None)


def test_client_labels_are_bounded():
    labels = CallerLabels(max_labels=2)
    assert labels.caller(None) is ANONYMOUS
    assert labels.caller("") is ANONYMOUS
    assert labels.caller("x" * 65) is ANONYMOUS
    assert labels.caller("bad label") is ANONYMOUS
    assert labels.caller("team-a") == Caller("team-a")
    assert labels.caller("team.b") == Caller("team.b")
    assert labels.caller("team-c") is OTHER  # beyond max_labels
    assert labels.caller("team-a") == Caller("team-a")  # known ones stay


def test_cost_counts_token_forwards():
    cost = Cost(tokens=102, forwards=100)
    assert cost.token_forwards == 10200
    assert "100 forwards of 102 tokens (10,200 token-forwards)" == cost.describe()
    assert Cost(tokens=7).describe() == "1 forward of 7 tokens (7 token-forwards)"
