"""Reproduce the paper: its experiments as a manifest (``paper.yaml``) and ``usclip sweep`` to run them.

See docs/reproduce.md for the datasets, the commands and the time each experiment takes.
"""

from usclip.reproduce.locks import LockHeldError, RunLock
from usclip.reproduce.manifest import (
    PAPER_MANIFEST,
    ManifestError,
    Run,
    default_protocol,
    expand_runs,
    load_datasets,
    load_manifest,
    order_runs,
    protocol_names,
    select_runs,
    slugify,
)
from usclip.reproduce.sweep import (
    RunFailedError,
    RunStatus,
    SweepInterruptedError,
    SweepPlan,
    build_commands,
    describe_status,
    dry_run_lines,
    execute_run,
    is_done,
    missing_configs,
    run_status,
    run_sweep,
    write_slurm_scripts,
)

__all__ = [
    "PAPER_MANIFEST",
    "LockHeldError",
    "ManifestError",
    "Run",
    "RunFailedError",
    "RunLock",
    "RunStatus",
    "SweepInterruptedError",
    "SweepPlan",
    "build_commands",
    "default_protocol",
    "describe_status",
    "dry_run_lines",
    "execute_run",
    "expand_runs",
    "is_done",
    "load_datasets",
    "load_manifest",
    "missing_configs",
    "order_runs",
    "protocol_names",
    "run_status",
    "run_sweep",
    "select_runs",
    "slugify",
    "write_slurm_scripts",
]
