"""The real local model server (llama.cpp serving SmolLM2-135M-Instruct) for tests marked `real_llm`.

The server is opt-in (bash scripts/setup_local_llm.sh). Without it these tests skip and say why, unless
MEMBUILDER_REQUIRE_REAL_LLM=1 (set by .ci/run, where the setup is a required step): then they fail.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from scripts.local_llm import LocalLLMError, LocalLLMServer, default_model, llama_cpp_installed

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before `-m` selection runs, so `-m "not real_llm"` sees the marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.real_llm)
            item.add_marker(pytest.mark.integration)


def _unavailable(reason: str):
    if os.environ.get("MEMBUILDER_REQUIRE_REAL_LLM") == "1":
        pytest.fail(f"{reason} (MEMBUILDER_REQUIRE_REAL_LLM=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def real_llm_available() -> None:
    """Skips (or, under MEMBUILDER_REQUIRE_REAL_LLM=1, fails) unless llama-cpp-python and a GGUF are installed."""
    if not llama_cpp_installed():
        _unavailable("llama-cpp-python is not installed: run bash scripts/setup_local_llm.sh")
    try:
        default_model()
    except LocalLLMError as exc:
        _unavailable(str(exc))


@pytest.fixture(scope="session")
def local_llm(real_llm_available, tmp_path_factory):
    """One llama.cpp server for the whole session (chat with JSON mode, and mean-pooled embeddings)."""
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with LocalLLMServer(log_path=log) as srv:
        yield srv
