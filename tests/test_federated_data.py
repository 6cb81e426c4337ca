"""Federated text splits: non-IID by construction, disjoint, nothing held out leaks into training."""

import pytest

from hetune.data.federated import make_federated_text
from hetune.errors import ConfigError


def test_knowledge_topics_each_live_at_one_client():
    data = make_federated_text("knowledge", 4)
    assert [len(h) for h in data.holdings] == [2, 2, 1, 1]
    held = [set(h) for h in data.holdings]
    assert all(not (a & b) for i, a in enumerate(held) for b in held[i + 1:])  # every client lacks the others' topics
    for client, docs in zip(data.holdings, data.clients):
        answers = {p.answer for p in data.held_out if any(p.answer and f"A: {p.answer}\n" in d for d in docs)}
        assert len(answers) == len(client)  # its lines teach exactly its topics' facts
    assert not set(data.eval_texts) & {d for docs in data.clients for d in docs}
    with pytest.raises(ConfigError, match="fewer than 7 clients"):
        make_federated_text("knowledge", 7)


def test_text_splits_stdlib_prose_by_package():
    data = make_federated_text("text", 3, max_docs=50)
    assert all(0 < len(docs) <= 50 for docs in data.clients)
    packages = [set(h) for h in data.holdings]
    assert all(not (a & b) for i, a in enumerate(packages) for b in packages[i + 1:]) and "email" in set().union(*packages)
    assert not set(data.eval_texts) & {d for docs in data.clients for d in docs} and not data.held_out
    with pytest.raises(ConfigError, match="not a federated text task"):
        make_federated_text("digits", 2)
