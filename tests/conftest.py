"""Shared fixtures and capability-based skipping.

Markers (registered in pyproject.toml, --strict-markers):

- ``gpu``: needs a CUDA device and onnxruntime's CUDA EP;
- ``tensorrt``: needs an importable ``tensorrt`` (or ``tensorrt_rtx`` for build-only tests);
- ``slow``: takes more than about 5 s; ``-m "not slow"`` is the quick loop (README).

Capabilities are detected without importing heavy packages.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from amp_search.demo import build_demo_model, demo_data


def _has_cuda_ep() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        return False


def _has_trt() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in ("tensorrt", "tensorrt_rtx"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_gpu = _has_cuda_ep()
    has_trt = _has_trt()
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU with onnxruntime-gpu"))
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(
                pytest.mark.skip(
                    reason="TensorRT is not installable in this workplace (PyPI libs are "
                    "stubs); runs where tensorrt or tensorrt_rtx imports"
                )
            )


@pytest.fixture(autouse=True, scope="session")
def _inspect_cache_of_this_run(tmp_path_factory: pytest.TempPathFactory) -> None:
    """``inspect``'s profile cache in a folder of this run, never the user's."""
    os.environ["AMP_SEARCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def demo_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("demo") / "demo.onnx"
    onnx.save(build_demo_model(), path)
    return path


@pytest.fixture(scope="session")
def demo_data_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("demo") / "demo.npz"
    np.savez(path, **demo_data())
    return path


REAL_MODELS = ("ppocr_cls", "ppocr_det", "ppocr_rec", "minilm")


@pytest.fixture(scope="session")
def real_model() -> object:
    """``real_model(name) -> (path, feeds)`` from the PyPI wheels (cached outside git).

    For the models in ``realmodels.STACKED`` the feeds are a stack of batches. A test asking
    for ``silero_vad`` skips, with the reason, where alsa-utils' recordings cannot be had.
    """
    from amp_search.errors import UserInputError
    from amp_search.testing import realmodels

    cache: dict[str, tuple[Path, dict[str, np.ndarray]]] = {}

    def get(name: str, n: int | None = None) -> tuple[Path, dict[str, np.ndarray]]:
        key = f"{name}:{n}"
        if key not in cache:
            try:
                cache[key] = (realmodels.fetch(name), realmodels.calibration(name, n))
            except UserInputError as exc:
                if "alsa-utils" in str(exc):
                    pytest.skip(str(exc))
                raise
        return cache[key]

    return get


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> object:
    """A PostgreSQL storage URL: ``$AMP_SEARCH_TEST_POSTGRES`` (what ``.ci/run`` starts), or a
    throwaway server on loopback. Skips without the server binaries, unless
    ``AMP_SEARCH_REQUIRE_POSTGRES=1`` (set by ``.ci/run``) makes that a failure."""
    import os

    url = os.environ.get("AMP_SEARCH_TEST_POSTGRES")
    if url:
        yield url
        return
    from amp_search.testing.postgres import PostgresServer, find_bindir

    required = os.environ.get("AMP_SEARCH_REQUIRE_POSTGRES") == "1"
    missing = None
    if find_bindir() is None:
        missing = "PostgreSQL server binaries not installed (apt-get install postgresql)"
    elif importlib.util.find_spec("psycopg") is None:
        missing = "psycopg (3) not installed (pip install -e '.[test]')"
    if missing:
        if required:
            pytest.fail(missing)
        pytest.skip(missing)
    server = PostgresServer(tmp_path_factory.mktemp("postgres"))
    yield server.start()
    server.stop(remove=True)


@pytest.fixture(scope="session")
def postgres_password(postgres_url: str) -> tuple[str, str]:
    """``(url, password)``: a role on the ``postgres_url`` server that must give its password
    (the README's ``postgresql://user:password@host/db`` form). The password is random, so
    finding it in any output is a leak. Fails if the server takes any password (one not
    started by ``amp_search.testing.postgres``): a test could not tell it reached the server."""
    import uuid

    import psycopg

    from amp_search.testing.postgres import password_url

    password = f"pw{uuid.uuid4().hex}"
    url = password_url(postgres_url, password)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(url.replace(password, "wrong"), connect_timeout=10).close()
    return url, password
