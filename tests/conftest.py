"""Shared fixtures: offline hubs, tiny open_clip model, synthetic and real data locations."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never download: set before anything imports huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
