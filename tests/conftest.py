"""Shared fixtures and the test tiers.

Tiers: ``python -m pytest -m "not slow"`` is the fast tier (every module, a few
minutes on 2 cores); ``python -m pytest`` runs everything (CI).  A test is ``slow``
when it runs whole pipelines, real DVC experiments, a real MLflow server, kills
processes, or spawns DDP workers; mark it with ``@pytest.mark.slow`` (or a module's
``pytestmark``).  ``shared`` marks tests that read ``../shared/datasets`` (licensed
data, never committed); they skip with a message where it is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest_http import http_server  # noqa: F401 - the local HTTP server fixture, for every test file
from tests.helpers import SHARED, make_prepared


@pytest.fixture(autouse=True)
def _quiet_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MLflow logging, no analytics, no update checks, unless a test turns them on itself.

    Stage code run in-process would otherwise write ``mlflow.db`` into the working
    directory; tests of tracking set ``VESSELSEG_TRACKING=1`` with their own store.
    """
    monkeypatch.setenv("VESSELSEG_TRACKING", "0")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")


@pytest.fixture
def prepared_small(tmp_path: Path) -> Path:
    """A prepared dataset of 48x48 line scenes: 4 train, 2 val, 2 test images with round FOVs."""
    return make_prepared(tmp_path / "prepared")


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """``../shared/datasets`` beside the checkout, or a skip naming what is missing."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not found: the licensed datasets are not in this checkout's neighbourhood")
    return SHARED
