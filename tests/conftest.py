"""Shared test settings: deterministic float64-friendly defaults, one thread (CI has 2 cores)."""

import os
import tempfile

import pytest
import torch

torch.set_num_threads(1)
# Trust records of the runs the tests create go to a scratch file, never the user's config (subprocesses
# inherit it).
os.environ["DYNASCOPE_TRUST_FILE"] = os.path.join(tempfile.mkdtemp(prefix="dynascope-trust-"), "trust.json")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def server(root, tmp_path_factory: pytest.TempPathFactory):
    """The app (``streamlit run``) over the browser test module's ``root`` runs folder: its URL."""
    from test_app_e2e import app_server

    with app_server(root, tmp_path_factory.mktemp("e2e-log") / "streamlit.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium (Playwright), one per browser test module."""
    from test_app_e2e import chromium

    with chromium() as b:
        yield b
