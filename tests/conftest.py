"""Shared fixtures: the real data folder (LLMMO_DATA_DIR) and a private cache per test session."""

import os
import tempfile
from pathlib import Path

import pytest

# Every test session tokenizes into its own cache, so that no test reads a stale cache from an earlier run
# and nothing is written to the user's ~/.cache/llmmo.
os.environ["LLMMO_CACHE"] = tempfile.mkdtemp(prefix="llmmo-test-cache-")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data folder; under CI=true a missing one fails the test, elsewhere it skips it."""
    value = os.environ.get("LLMMO_DATA_DIR", "")
    if value and Path(value).is_dir():
        return Path(value)
    reason = f"LLMMO_DATA_DIR is not set to a data folder (got {value!r}); point it at ../shared/data"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shakespeare(data_dir: Path) -> Path:
    return data_dir / "tinyshakespeare" / "input.txt"
