from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import Broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A fresh Mosquitto with the project's configuration, on a free port."""
    with Broker(tmp_path / "broker") as b:
        yield b


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny demo models (``tiny-decoder.onnx``, ``tiny-gru.onnx``), built once per session."""
    from edge_agent.models import build_all

    return build_all(tmp_path_factory.mktemp("models"))
