"""``usclip sweep MANIFEST``: run (or print, or write SLURM scripts for) a manifest's experiments.

``MANIFEST`` is a YAML path or ``paper`` (the packaged Tables 2 and 3). ``--protocol`` chooses the manifest's
protocol (``paper``: ``authors``, the default, or ``usclip``; ``all`` or ``both`` for every one). The logic lives in
:mod:`usclip.reproduce`; docs/reproduce.md shows the whole path from datasets to tables.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from usclip.reproduce import (
    ManifestError,
    Run,
    RunFailedError,
    SweepInterruptedError,
    SweepPlan,
    default_protocol,
    dry_run_lines,
    expand_runs,
    load_datasets,
    load_manifest,
    order_runs,
    protocol_names,
    run_sweep,
    select_runs,
    write_slurm_scripts,
)

log = logging.getLogger(__name__)


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds expects integers like '1,2,3', got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds needs at least one seed")
    return seeds


def _jobs(text: str) -> int:
    try:
        jobs = int(text)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise argparse.ArgumentTypeError(f"--jobs expects a whole number of runs at a time, at least 1; got {text!r}")
    return jobs


def _devices(text: str) -> list[str]:
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise argparse.ArgumentTypeError(f"--devices expects device ids like '0,1', got {text!r}")
    return devices


def chosen_protocols(manifest: dict[str, Any], value: str | None) -> list[str | None]:
    """The protocols ``--protocol value`` selects: ``None`` -> the default; ``all`` (or ``both``, for two) -> every one.

    Raises:
        ManifestError: ``all``/``both`` for a manifest without protocols, or ``both`` for one without exactly two.
    """
    names = protocol_names(manifest)
    if value not in ("all", "both"):
        return [value if value is not None else default_protocol(manifest)]
    if not names or (value == "both" and len(names) != 2):
        raise ManifestError(f"--protocol {value}: {manifest['path']} declares {len(names)} protocols {names}")
    return list(names)


def build_parser() -> argparse.ArgumentParser:
    """The ``usclip sweep`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="usclip sweep",
        description="Run a manifest of experiments (tables x methods x datasets x seeds); see docs/reproduce.md.",
    )
    parser.add_argument("manifest", help="manifest YAML, or 'paper' for the packaged Tables 2 and 3")
    parser.add_argument("--datasets", type=Path, help="YAML: dataset name -> folder (e.g. 'BUSI: /data/BUSI')")
    parser.add_argument("--runs-root", type=Path, default=Path("runs/paper"), help="run folders (runs/paper)")
    parser.add_argument(
        "--config-root", type=Path, default=Path("."), help="folder the manifest's config paths start from (.)"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="keep runs of this table, group, dataset or method (repeatable; same kind: or, different kinds: and); "
        "their dependencies are kept",
    )
    parser.add_argument(
        "--protocol",
        metavar="NAME",
        help="the manifest's protocol: for 'paper' 'authors' (the default: what produced the published numbers) or "
        "'usclip' (usclip's defaults); 'all' or 'both' runs every protocol, each in <runs-root>/<protocol>/",
    )
    parser.add_argument("--seeds", type=_seeds, help="seeds instead of the manifest's, e.g. '1' or '1,2,3'")
    parser.add_argument("--dry-run", action="store_true", help="print every command in dependency order; run nothing")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local", help="local runs or sbatch scripts")
    parser.add_argument("--slurm-out", type=Path, help="folder for the sbatch scripts and submit.sh (--launcher slurm)")
    parser.add_argument(
        "--sbatch-option",
        action="append",
        default=[],
        metavar="OPT",
        help="an #SBATCH line for every job, e.g. '--gres=gpu:1' or '--time=12:00:00' (repeatable)",
    )
    parser.add_argument("--run", metavar="KEY", help="run only this run (its folder under --runs-root); SLURM tasks")
    parser.add_argument(
        "--in-process", action="store_true", help="run the usclip commands in this process (no subprocess per command)"
    )
    parser.add_argument(
        "--jobs", type=_jobs, default=1, metavar="N", help="runs at a time, each in its own processes (1)"
    )
    parser.add_argument(
        "--devices",
        type=_devices,
        metavar="IDS",
        help="GPU ids to spread the runs over, round-robin by job slot (CUDA_VISIBLE_DEVICES per run), e.g. '0,1'",
    )
    parser.add_argument(
        "--lock-stale-after",
        type=float,
        default=600.0,
        metavar="S",
        help="seconds after which another host's run lock that was not refreshed is taken over (600); a lock of a "
        "dead process on this host is taken over at once",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="also print the library's log messages")
    return parser


def main(argv: Sequence[str]) -> int:
    """Run ``usclip sweep`` with ``argv`` (without the leading ``sweep``); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.in_process and (args.jobs > 1 or args.devices):
        parser.error("--in-process runs one run at a time: drop --jobs and --devices, or --in-process")
    if args.lock_stale_after <= 0:
        parser.error(f"--lock-stale-after expects a positive number of seconds, got {args.lock_stale_after}")
    if args.launcher == "slurm" and args.slurm_out is None:
        parser.error("--launcher slurm needs --slurm-out DIR (the scripts are written there, never submitted)")
    try:
        manifest = load_manifest(args.manifest)
        runs = [r for p in chosen_protocols(manifest, args.protocol) for r in expand_runs(manifest, args.seeds, p)]
        datasets = load_datasets(args.datasets) if args.datasets is not None else None
        manifest_ref = "paper" if args.manifest == "paper" else str(Path(args.manifest).resolve())
        plan = SweepPlan(args.runs_root.resolve(), datasets, args.config_root.resolve(), manifest_ref)
        if args.run is not None:
            known = {r.key: r for r in runs}
            if args.run not in known:
                raise ManifestError(f"--run {args.run!r} is not a run of {args.manifest} (e.g. {next(iter(known))})")
            selected, deps = [known[args.run]], list[Run]()
        else:
            selected, deps = select_runs(runs, args.only)
        if deps:
            print(f"# {len(deps)} runs kept as dependencies of the selection: {[d.key for d in deps][:5]}...")
        ordered = order_runs(deps + selected)
        if args.dry_run:
            # `| head`: the router (usclip.cli._run_printing) ends a closed pipe quietly, as for every list command
            print("\n".join(dry_run_lines(ordered, plan, deps)), flush=True)
            return 0
        if plan.datasets is None and any(r.needs for r in ordered):
            raise ManifestError(
                "--datasets is required to run: the runs read "
                f"{sorted({n for r in ordered for n in r.needs})} (a YAML file 'NAME: /path/to/folder')"
            )
        if args.launcher == "slurm":
            files = write_slurm_scripts(
                ordered, plan, args.slurm_out, manifest_ref, args.datasets, args.sbatch_option, args.protocol
            )
            for path in files:
                print(f"wrote {path}")
            print(f"submit with: bash {files[-1]}")
            return 0
        outcome = run_sweep(
            ordered,
            plan,
            args.in_process,
            known={r.key: r for r in runs},
            jobs=args.jobs,
            devices=args.devices,
            stale_after=args.lock_stale_after,
        )
    except (FileNotFoundError, ManifestError) as err:
        print(f"usclip sweep: {err}", file=sys.stderr)
        return 2
    except RunFailedError as err:
        if err.outcome:
            print(", ".join(f"{k}: {len(v)}" for k, v in err.outcome.items()))
        print(f"usclip sweep: {err}", file=sys.stderr)
        return 1
    except SweepInterruptedError:
        print(
            "usclip sweep: stopped (SIGTERM): running commands ended, locks released; run it again to go on",
            file=sys.stderr,
        )
        return 143
    print(", ".join(f"{k}: {len(v)}" for k, v in outcome.items()))
    return 0
