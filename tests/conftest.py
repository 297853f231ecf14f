"""One engine cache (the classifiers of labelled data, decoded image folders) for the whole session.

Every test process, in-process or spawned through the CLI, shares it: the classifier is
trained once per session instead of once per test, and a developer's ~/.cache never makes
a test pass that would fail on a fresh CI machine."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_CACHE: str | None = None
CHECKOUT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    global _CACHE
    # `harness` processes the tests spawn run in a temp folder: a relative PYTHONPATH (".")
    # means that folder there, and the package then comes from wherever the environment's
    # editable install points (another checkout), not from the code under test
    paths = [CHECKOUT, *(Path(p).resolve() for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(map(str, paths)))
    _CACHE = tempfile.mkdtemp(prefix="ddpm-engine-cache-")
    os.environ["DDPM_ENGINE_CACHE"] = _CACHE


def pytest_unconfigure(config):
    if _CACHE is not None:
        shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture
def one_thread():
    """Runs a test on one torch thread, then restores the count. For sampling chains of many
    small products: on the 2 shared cores here torch's thread pool made them up to 18x slower
    than one thread (741 s against 41 s for one sample_with_drift of 500 images, measured
    2026-12-07 beside a training study)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
