"""The Hugging Face Hub side of sharing: ``hf-hub:owner/name`` sources and pushing a folder.

Both go through ``huggingface_hub`` (``snapshot_download``, ``HfApi.create_repo`` / ``upload_folder``): its cache,
offline mode (``HF_HUB_OFFLINE=1`` reads the cache only), tokens and revisions work as for any Hub model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from usclip.sharing.layout import FOLDER_FILES, SharingError, read_config

log = logging.getLogger(__name__)

#: the prefix of a Hub source, as open_clip writes it
HUB_PREFIX = "hf-hub:"


def resolve_source(
    source: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
) -> Path:
    """The local folder of a source: the folder itself, or the Hub snapshot of ``hf-hub:owner/name``.

    Only the files of a pretrained folder are downloaded (``model.safetensors``, ``config.json``,
    ``preprocessing.json``, ``README.md``), not exports that may sit beside them in the repository.

    Raises:
        usclip.sharing.layout.SharingError: a Hub id that is not ``owner/name``, or one that cannot be downloaded
            (offline without it in the cache, no such repository, no access).
    """
    text = str(source)
    if not text.startswith(HUB_PREFIX):
        return Path(text).expanduser()
    repo_id = text.removeprefix(HUB_PREFIX)
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise SharingError(f"source={text!r}: expected hf-hub:owner/name (a Hugging Face model repository)")
    from huggingface_hub import constants, snapshot_download

    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            allow_patterns=list(FOLDER_FILES),
        )
    except Exception as err:  # huggingface_hub's errors: offline cache miss, not found, gated, network
        where = cache_dir or constants.HF_HUB_CACHE
        offline = " HF_HUB_OFFLINE is set, so only the cache is read." if constants.is_offline_mode() else ""
        raise SharingError(
            f"could not get {text!r} (revision {revision or 'main'}) from the Hugging Face Hub or its cache "
            f"{where}: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}."
            f"{offline} Check the repository id and your access (huggingface-cli login), or pass a local folder."
        ) from err
    return Path(path)


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload usclip model",
    revision: str | None = None,
) -> Any:
    """Upload a folder written by :func:`usclip.sharing.save_pretrained` (and any exports in it) to the Hub.

    Creates the model repository when it does not exist (``private`` as given), then uploads the folder's files
    in one commit with ``HfApi.upload_folder``.

    Args:
        folder: the pretrained folder.
        repo_id: ``owner/name`` (an ``hf-hub:`` prefix is dropped).
        private: make a new repository private.
        token: the Hub token (``None``: the logged-in one).
        commit_message: the commit's message.
        revision: the branch to push to (``None``: ``main``).

    Returns:
        ``huggingface_hub``'s commit info (``.commit_url``).
    """
    from huggingface_hub import HfApi

    read_config(folder)  # a pretrained folder, not any folder
    repo = repo_id.removeprefix(HUB_PREFIX)
    api = HfApi(token=token)
    api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo,
        repo_type="model",
        commit_message=commit_message,
        revision=revision,
        ignore_patterns=[".*"],
    )
    log.info("pushed %s to https://huggingface.co/%s", folder, repo)
    return info
