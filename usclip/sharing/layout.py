"""The layout of a shared model folder: its file names, its ``config.json`` format, and the error for bad ones.

Kept apart from :mod:`usclip.sharing.folder` (which saves and loads) so that :mod:`usclip.sharing.hub` can name the
files it downloads and check a folder before pushing it without importing the loader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: the folder's ``config.json`` ``format`` and ``format_version``
FORMAT = "usclip-pretrained"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PREPROCESSING_FILE = "preprocessing.json"
CARD_FILE = "README.md"
#: the files :func:`save_pretrained` writes
FOLDER_FILES = (WEIGHTS_FILE, CONFIG_FILE, PREPROCESSING_FILE, CARD_FILE)


class SharingError(ValueError):
    """A source or folder that cannot be saved or loaded; the message names it and what was expected."""


def read_config(folder: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a pretrained folder, checked to be one.

    Raises:
        SharingError: not a folder, no ``config.json``, or a ``config.json`` of another format.
    """
    path = Path(folder)
    if not path.is_dir():
        raise SharingError(f"{str(folder)!r} is not a folder: expected a folder written by usclip export")
    file = path / CONFIG_FILE
    if not file.is_file():
        hint = " (a run directory: load it with usclip.tasks.load_task)" if (path / "checkpoints").is_dir() else ""
        raise SharingError(f"{path} has no {CONFIG_FILE}: expected a folder written by usclip export{hint}")
    config = json.loads(file.read_text())
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise SharingError(f"{file} is not a usclip model config (its format is not {FORMAT!r})")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise SharingError(
            f"{file} has format_version {config['format_version']}, newer than this usclip's {FORMAT_VERSION}: "
            "upgrade usclip"
        )
    return config
