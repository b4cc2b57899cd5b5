from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
PARITY = FIXTURES / "m2fp-parity"
PARITY_IMAGES = ("astronaut.jpg", "camera.png", "two_figures.png")
MODES = ("tiny-multiple", "tiny-single")


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return PARITY


@pytest.fixture(scope="session")
def multiple_parser():
    from m2fp_api import HumanParser

    return HumanParser.from_pretrained(PARITY / "tiny-multiple", allow_download=False)


@pytest.fixture(scope="session")
def single_parser():
    from m2fp_api import HumanParser

    return HumanParser.from_pretrained(PARITY / "tiny-single", allow_download=False)


def start_redis():
    from server import HAS_REDIS, NO_REDIS, Redis

    if not HAS_REDIS:
        pytest.skip(NO_REDIS)
    r = Redis()
    yield r
    r.stop()


@pytest.fixture
def redis():
    """A redis-server of the test's own (it may stop and start it)."""
    yield from start_redis()


@pytest.fixture(scope="session")
def shared_redis():
    """One redis-server for the tests that only need a Redis; each empties it first."""
    yield from start_redis()


@pytest.fixture(params=["memory", "redis"])
def make_store(request):
    """Makes an empty task store of each kind, so that a test runs over both."""
    from m2fp_api.tasks.store import MemoryStore

    def make(ttl_s: float = 60, max_finished: int = 100):
        if request.param == "memory":
            return MemoryStore(ttl_s=ttl_s, max_finished=max_finished, max_output_bytes=2**30)
        from m2fp_api.tasks.redis_store import RedisStore

        store = RedisStore(request.getfixturevalue("shared_redis").url, ttl_s=ttl_s,
                           max_finished=max_finished, unfinished_ttl_s=60)
        store.redis.flushdb()
        return store
    return make


def load_expected(mode: str) -> dict:
    return dict(np.load(PARITY / mode / "expected.npz"))


def configuration(mode: str) -> dict:
    return json.loads((PARITY / mode / "configuration.json").read_text())
