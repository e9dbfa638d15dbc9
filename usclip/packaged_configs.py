"""The YAML configs shipped inside the package (``usclip/configs``, the repository's ``configs/`` folder).

A user who installed the wheel has no repository: ``usclip fit --config busi_seg.yaml`` (or
``configs/busi_seg.yaml``) then finds the packaged file when no such path exists, and ``usclip configs`` lists
them. In the repository ``usclip/configs`` is a link to ``configs/``, so both name the same files.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["list_configs", "packaged_configs_dir", "resolve_config"]


def packaged_configs_dir() -> Path:
    """The folder of the shipped configs."""
    return Path(__file__).resolve().parent / "configs"


def resolve_config(value: str, cwd: Path | None = None) -> str:
    """``value`` if it names an existing file (relative to ``cwd``), else the packaged config of that name.

    ``busi_seg.yaml``, ``configs/busi_seg.yaml`` and ``baselines/unet.yaml`` all find the packaged files; a name
    that is neither a file nor a packaged config is returned unchanged (the parser then reports it).
    """
    base = Path.cwd() if cwd is None else cwd
    path = Path(value)
    if (base / path).is_file() or path.is_absolute():
        return value
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    if not parts:
        return value
    candidate = packaged_configs_dir().joinpath(*parts)
    return str(candidate) if candidate.is_file() else value


def list_configs() -> list[str]:
    """Names of the shipped configs relative to the configs folder, sorted (``busi_seg.yaml``, ``adapters/...``)."""
    root = packaged_configs_dir()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.yaml"))
