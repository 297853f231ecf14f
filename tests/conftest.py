"""One engine cache (the classifiers of labelled data, decoded image folders) for the whole session.

Every test process, in-process or spawned through the CLI, shares it: the classifier is
trained once per session instead of once per test, and a developer's ~/.cache never makes
a test pass that would fail on a fresh CI machine."""

import os
import shutil
import tempfile

_CACHE: str | None = None


def pytest_configure(config):
    global _CACHE
    _CACHE = tempfile.mkdtemp(prefix="ddpm-engine-cache-")
    os.environ["DDPM_ENGINE_CACHE"] = _CACHE


def pytest_unconfigure(config):
    if _CACHE is not None:
        shutil.rmtree(_CACHE, ignore_errors=True)
