"""The public surface: every name in ``__all__`` exists, and the package re-exports each
module's public names it documents."""

from __future__ import annotations

import importlib

import pytest

import edge_agent.errors
import edge_agent.protocol

MODULES = ["messages", "topics", "chunking", "agent", "server"]


@pytest.mark.parametrize("name", MODULES)
def test_module_all_exists(name: str) -> None:
    module = importlib.import_module(f"edge_agent.protocol.{name}")
    assert module.__doc__ and "never" in module.__doc__  # says what it must never do
    for attr in module.__all__:
        assert hasattr(module, attr), f"{name}.{attr}"


def test_package_all() -> None:
    for attr in edge_agent.protocol.__all__:
        assert hasattr(edge_agent.protocol, attr), attr
    exported = set(edge_agent.protocol.__all__)
    for name in ["agent", "server"]:
        module = importlib.import_module(f"edge_agent.protocol.{name}")
        assert set(module.__all__) <= exported, set(module.__all__) - exported


def test_protocol_errors_are_in_the_tree() -> None:
    e = edge_agent.errors
    for name in [
        "MalformedMessage",
        "UnsupportedMessage",
        "InvalidTopic",
        "TopicMismatch",
        "ChunkRejected",
    ]:
        cls = getattr(e, name)
        assert issubclass(cls, e.RemoteProtocolError) and name in e.__all__
        assert name in (e.__doc__ or "")
    assert issubclass(e.TransferTooLarge, e.ChunkRejected)
    for attr in e.__all__:
        assert hasattr(e, attr)
