"""Shared fixtures: offline hubs, tiny open_clip model, synthetic and real data locations."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

# Tests never download: set before anything imports huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`pytest -n 2`) each worker is one process: one thread each, or the workers' torch thread pools
# fight over the same cores (set before torch is imported; subprocesses of a test inherit it).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    return Path(os.environ.get("USCLIP_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real ultrasound data folder (BUSI, DDTI); tests that need it skip with a reason when absent."""
    root = _shared_data_dir()
    if not (root / "BUSI").is_dir():
        pytest.skip(f"real data not found at {root} (set USCLIP_DATA_DIR to the folder holding BUSI/ and DDTI/)")
    return root


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread per xdist worker, even where a plugin imported torch before this file set the variables."""
    if os.environ.get("PYTEST_XDIST_WORKER") and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


@pytest.fixture(scope="module")
def fit_parser() -> Any:
    """usclip's CLI parser, built once per module: composing a config pair then costs a parse, not a new CLI."""
    import contextlib

    from usclip.cli import UsclipCLI
    from usclip.data.datamodules import BaseDataModule
    from usclip.tasks import BaseTask

    class _Stop(Exception):
        pass

    class _ParserOnly(UsclipCLI):  # stops after building its parser (parsing is all these tests need)
        parser_: Any = None

        def parse_arguments(self, parser: Any, args: Any) -> None:
            type(self).parser_ = parser
            raise _Stop

    with contextlib.suppress(_Stop):
        _ParserOnly(BaseTask, BaseDataModule, subclass_mode_model=True, subclass_mode_data=True, args=[])
    return _ParserOnly.parser_
