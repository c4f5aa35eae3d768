"""Shared fixtures: offline settings, tiny model directories built once per session, test images and chats."""

from __future__ import annotations

import os
import signal

# Nothing may reach a model hub, in any test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lit_sftrl.models.tiny import FAMILIES  # noqa: E402

# Text in the style of the environments' prompts and answers: what the integrator trains tokenizers on.
TEST_CORPUS = [
    "You are playing the 24 game. Cards: A, 5, 10, K. Use each card once to reach 24.",
    '{"cards": ["A", "5", "10", "K"], "number": [1, 5, 10, 10], "formula": "(10 - 5) * 1 + 10 = 24"}',
    "You failed this trial because the formula evaluates to 23, not the target.",
    '{"current observation": "No landmark nearby", "current instruction": "Turn left to face north.", '
    '"action": "turn_direction(north)"}',
    " ".join(str(i) for i in range(100)),
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first (stable otherwise): pytest-xdist's workers then start on the long end-to-end runs
    side by side and fill the rest of the time with the short tests, instead of one worker finishing the long ones
    alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread_and_clean_argv():
    """One intra-op thread: tiny models gain nothing from more, and on a shared 2-core machine OpenMP threads
    waiting on each other make them 5-10x slower. And no pytest argv for LightningCLI to warn about."""
    import sys

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["lit-sftrl"])
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return list(TEST_CORPUS)


@pytest.fixture(scope="session")
def tiny_dir_factory(tmp_path_factory) -> Callable[..., Path]:
    """``factory(family, size="tiny")`` -> a tiny model directory, built once per session."""
    from lit_sftrl.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("models")
    built: dict[tuple[str, str], Path] = {}

    def factory(family: str, size: str = "tiny") -> Path:
        key = (family, size)
        if key not in built:
            suffix = "" if size == "tiny" else "-small"
            built[key] = make_tiny(root / f"tiny-{family}{suffix}", family=family, size=size, corpus=TEST_CORPUS)
        return built[key]

    return factory


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_dir(family, tiny_dir_factory) -> Path:
    return tiny_dir_factory(family)


def random_image(seed: int, size: int = 224) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def images() -> list[np.ndarray]:
    # Non-square on purpose: the processors must resize them to the model's tile.
    return [random_image(seed, 224) for seed in range(3)] + [
        np.random.default_rng(9).integers(0, 256, (180, 260, 3), dtype=np.uint8)
    ]


@pytest.fixture(scope="session")
def chats() -> list[list[dict[str, str]]]:
    """First-turn chats of very different lengths (left padding matters)."""
    return [
        [{"role": "user", "content": "Cards: A, 5."}],
        [{"role": "user", "content": TEST_CORPUS[0]}],
        [{"role": "user", "content": "24?"}],
        [
            {"role": "user", "content": TEST_CORPUS[0]},
            {"role": "assistant", "content": TEST_CORPUS[1]},
            {"role": "user", "content": TEST_CORPUS[2]},
        ],
    ]


@pytest.fixture
def alarm():
    """Fail instead of hanging: hostile inputs that once took minutes, all memory or for ever."""
    def timeout(*_):
        raise TimeoutError("hung")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
