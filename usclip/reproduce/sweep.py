"""Run a manifest's experiments: command lines, local runs one after another, SLURM job-array scripts.

Nothing here schedules: local runs are ``usclip`` subprocesses started one after another (Lightning does the work),
and the SLURM launcher only writes ``sbatch`` scripts and a submit script for the user to run.

Per run directory (``<runs_root>/<run key>``):

- ``sweep_run.json``: written before the first command (table, group, method, dataset, seed, manifest, protocol,
  commands).
- ``sweep.log``: the stdout and stderr of every command, appended, each after a ``#`` line with the command.
- ``sweep_progress.json``: how many of the run's commands finished, so that a restarted sweep continues with the
  next one. A ``fit`` that was killed resumes with ``--ckpt_path last``, which ``usclip._resume`` resolves within
  the logger's ``save_dir/name/version`` (``seed_<k>``): the same folder.

A run counts as finished when ``results/test_metrics.json`` exists (runs that test) or all its commands finished.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from usclip._io import write_text_atomic
from usclip.packaged_configs import resolve_config
from usclip.reproduce.manifest import PLACEHOLDER, ManifestError, Run

log = logging.getLogger(__name__)

__all__ = [
    "RunFailedError",
    "SweepPlan",
    "build_commands",
    "dry_run_lines",
    "execute_run",
    "is_done",
    "missing_configs",
    "run_sweep",
    "write_slurm_scripts",
]


class RunFailedError(RuntimeError):
    """A command of a run exited with an error; the message names the run and its log file."""


@dataclass
class SweepPlan:
    """Where a sweep reads and writes.

    Args:
        runs_root: folder holding every run directory.
        datasets: dataset name -> folder (``None``: placeholders stay as ``${NAME}``, dry runs only).
        config_root: folder the manifest's config paths are relative to (and where commands run).
        manifest: the manifest's path, or ``paper`` (recorded in ``sweep_run.json``).
    """

    runs_root: Path
    datasets: dict[str, str] | None
    config_root: Path
    manifest: str = "paper"

    def run_dir(self, run: Run | str) -> Path:
        """The run's directory."""
        return self.runs_root / (run if isinstance(run, str) else run.key)


def _substitute(value: str, datasets: dict[str, str] | None, run: Run) -> str:
    if datasets is None:
        return value

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in datasets:
            raise ManifestError(
                f"run {run.key} needs dataset {name!r}, which the datasets file does not name (it has "
                f"{sorted(datasets)}); add a line '{name}: /path/to/folder'"
            )
        return datasets[name]

    return PLACEHOLDER.sub(replace, value)


def build_commands(run: Run, plan: SweepPlan) -> list[list[str]]:
    """The run's ``usclip`` command lines (``["usclip", "fit", ...]``), in order, without resume options."""
    run_dir = plan.run_dir(run)
    base: list[str] = []
    for config in run.configs:
        base += ["--config", config]
    for option, value in run.args.items():
        base += [option, _substitute(value, plan.datasets, run)]
    if run.adapter_from is not None:
        adapters = plan.run_dir(run.adapter_from) / "adapters" / "best.safetensors"
        base += ["--model.init_args.adapter_checkpoint", str(adapters)]
    base += [
        "--seed_everything",
        str(run.seed),
        "--trainer.logger.init_args.save_dir",
        str(plan.runs_root / run.save_dir),
        "--trainer.logger.init_args.name",
        run.slug,
        "--trainer.logger.init_args.version",
        f"seed_{run.seed}",
    ]
    commands = []
    for sub in run.subcommands:
        cmd = ["usclip", sub, *base]
        if sub == "test":
            source = run_dir if "fit" in run.subcommands else plan.run_dir(run.ckpt_from) if run.ckpt_from else None
            if source is not None:
                cmd += ["--ckpt_path", str(source / "checkpoints" / "best.ckpt")]
        commands.append(cmd)
    return commands


def missing_configs(run: Run, plan: SweepPlan) -> list[str]:
    """Config files of ``run`` that do not exist under the config root."""
    return [c for c in run.configs if not Path(plan.config_root, resolve_config(c, plan.config_root)).is_file()]


def _progress(run_dir: Path) -> int:
    path = run_dir / "sweep_progress.json"
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["completed"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return 0


def is_done(run: Run, plan: SweepPlan) -> bool:
    """Whether the run finished: test results written (runs that test) or every command finished."""
    run_dir = plan.run_dir(run)
    if "test" in run.subcommands and (run_dir / "results" / "test_metrics.json").is_file():
        return True
    return _progress(run_dir) >= len(run.subcommands)


def _record(run: Run, plan: SweepPlan, commands: list[list[str]]) -> None:
    info = {
        "table": run.table,
        "group": run.group,
        "method": run.method,
        "dataset": run.dataset,
        "seed": run.seed,
        "manifest": plan.manifest,
        "protocol": run.protocol,
        "deterministic": run.deterministic,
        "commands": commands,
        "reference": run.reference,
        "depends": run.depends,
    }
    write_text_atomic(plan.run_dir(run) / "sweep_run.json", json.dumps(info, indent=2) + "\n")


def _run_in_process(argv: list[str], log_file: Path, cwd: Path) -> int:
    """Run ``usclip argv`` in this process from ``cwd``, stdout/stderr into ``log_file``; returns an exit status."""
    from usclip.cli import main

    previous = Path.cwd()
    os.chdir(cwd)  # the manifest's config paths start at the config root, as in a subprocess
    try:
        return _main_logged(main, argv, log_file)
    finally:
        os.chdir(previous)


def _main_logged(main: Callable[[list[str]], object], argv: list[str], log_file: Path) -> int:
    with (
        log_file.open("a", encoding="utf-8") as handle,
        contextlib.redirect_stdout(handle),
        contextlib.redirect_stderr(handle),
    ):
        # log records too (handlers made earlier keep the old stderr): Lightning's loggers do not propagate
        handler = logging.StreamHandler(handle)
        loggers = [logging.getLogger(name) for name in ("", "lightning.pytorch", "lightning.fabric")]
        for logger in loggers:
            logger.addHandler(handler)
        try:
            main(argv)
        except SystemExit as err:
            return err.code if isinstance(err.code, int) else 1
        except Exception:
            traceback.print_exc(file=handle)
            return 1
        finally:
            for logger in loggers:
                logger.removeHandler(handler)
    return 0


def _run_subprocess(argv: list[str], log_file: Path, cwd: Path) -> int:
    with log_file.open("a", encoding="utf-8") as handle:
        handle.flush()
        proc = subprocess.run(
            [sys.executable, "-m", "usclip", *argv], cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, check=False
        )
    return proc.returncode


def execute_run(run: Run, plan: SweepPlan, in_process: bool = False) -> None:
    """Run the run's commands that have not finished yet, one after another.

    A ``fit`` whose ``checkpoints/last.ckpt`` exists continues from it (``--ckpt_path last``).

    Raises:
        RunFailedError: a command exited with an error (names the run, the command and ``sweep.log``).
    """
    run_dir = plan.run_dir(run)
    commands = build_commands(run, plan)
    run_dir.mkdir(parents=True, exist_ok=True)
    _record(run, plan, commands)
    log_file = run_dir / "sweep.log"
    for i in range(_progress(run_dir), len(commands)):
        argv = commands[i][1:]
        resumed = argv[0] == "fit" and (run_dir / "checkpoints" / "last.ckpt").is_file()
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        if resumed:
            argv += ["--ckpt_path", "last"]
        elif argv[0] == "fit" and (run_dir / "checkpoints").exists():
            # killed before its first last.ckpt: a best.ckpt of that attempt would shadow the new run's (Lightning
            # would write best-v1.ckpt), so the old checkpoints are moved aside, not deleted
            stale = run_dir / f"checkpoints_stale_{stamp.replace(':', '')}"
            (run_dir / "checkpoints").rename(stale)
            log.warning("%s: no last.ckpt to resume from; moved the old checkpoints to %s", run.key, stale)
        with log_file.open("a", encoding="utf-8") as handle:
            handle.write(f"# {stamp} {'resume: ' if resumed else ''}{shlex.join(['usclip', *argv])}\n")
        log.info("%s: usclip %s%s", run.key, argv[0], " (resuming from last.ckpt)" if resumed else "")
        runner = _run_in_process if in_process else _run_subprocess
        status = runner(argv, log_file, plan.config_root)
        if status != 0:
            raise RunFailedError(
                f"run {run.key} ({run.method}, {run.dataset}, seed {run.seed}) failed: `usclip {argv[0]}` exited with "
                f"status {status}; see {log_file}"
            )
        write_text_atomic(run_dir / "sweep_progress.json", json.dumps({"completed": i + 1}) + "\n")


def run_sweep(
    runs: list[Run],
    plan: SweepPlan,
    in_process: bool = False,
    echo: Callable[[str], None] = print,
    known: dict[str, Run] | None = None,
) -> dict[str, list[str]]:
    """Run ``runs`` (in dependency order) locally: skip finished ones, list missing configs, stop on a failure.

    Args:
        runs: the runs, dependencies first (:func:`usclip.reproduce.select_runs`).
        plan: folders and datasets.
        in_process: run the ``usclip`` commands in this process instead of one subprocess each (tests, debugging).
        echo: where progress lines go.
        known: every run of the manifest by key, to check dependencies outside ``runs`` (``--run KEY``).

    Returns:
        Run keys by outcome: ``ran``, ``done`` (skipped, finished before), ``missing`` (a config file is missing),
        ``blocked`` (a dependency is missing).

    Raises:
        RunFailedError: a run failed; the runs after it are not started.
    """
    outcome: dict[str, list[str]] = {"ran": [], "done": [], "missing": [], "blocked": []}
    unusable: set[str] = set()
    finished: set[str] = set()
    known = known or {}
    for n, run in enumerate(runs, 1):
        label = f"[{n}/{len(runs)}] {run.key}"
        lacking = missing_configs(run, plan)
        blocked = [d for d in run.depends if d in unusable]
        if lacking or blocked:
            unusable.add(run.key)
            kind = "missing" if lacking else "blocked"
            outcome[kind].append(run.key)
            echo(f"{label}: {kind}: " + (f"config {', '.join(lacking)} not found" if lacking else f"needs {blocked}"))
            continue
        if is_done(run, plan):
            outcome["done"].append(run.key)
            finished.add(run.key)
            echo(f"{label}: finished before, skipped")
            continue
        unfinished = [d for d in run.depends if d not in finished and not (d in known and is_done(known[d], plan))]
        if unfinished:
            raise RunFailedError(
                f"run {run.key} needs {unfinished}, which have not finished; run the sweep without --run (or with "
                "--only selecting them) first"
            )
        echo(f"{label}: running ({run.method}, {run.dataset}, seed {run.seed}); log: {plan.run_dir(run) / 'sweep.log'}")
        execute_run(run, plan, in_process=in_process)
        outcome["ran"].append(run.key)
        finished.add(run.key)
    return outcome


def dry_run_lines(runs: list[Run], plan: SweepPlan, dependencies: list[Run] | None = None) -> list[str]:
    """The sweep as a shell script: a ``#`` line per run, then its commands, one shell-quoted line each."""
    protocols = list(dict.fromkeys(r.protocol for r in runs if r.protocol is not None))
    under = f" (protocol {', '.join(protocols)})" if protocols else ""
    lines = [f"# usclip sweep {plan.manifest}{under}: {len(runs)} runs; run from {plan.config_root}"]
    if plan.datasets is None:
        lines.append("# no --datasets file: ${NAME} stands for the folder of dataset NAME")
    extra = {r.key for r in dependencies or []}
    unusable: set[str] = set()
    for run in runs:
        lacking = missing_configs(run, plan)
        blocked = [d for d in run.depends if d in unusable]
        if lacking or blocked:
            unusable.add(run.key)
        status = (
            "missing: " + ", ".join(lacking)
            if lacking
            else "blocked: needs " + ", ".join(blocked)
            if blocked
            else "finished"
            if is_done(run, plan)
            else ""
        )
        why = " (dependency of the selection)" if run.key in extra else ""
        head = f"# {run.key}: {run.method} | {run.dataset} | seed {run.seed}{why}"
        lines.append(head + (f" [{status}]" if status else ""))
        if run.note:
            lines.append(f"#   note: {run.note}")
        if lacking or blocked:
            continue
        lines += [shlex.join(cmd) for cmd in build_commands(run, plan)]
    return lines


def _levels(runs: list[Run]) -> list[list[Run]]:
    level: dict[str, int] = {}
    for run in runs:  # dependency order: dependencies come first
        level[run.key] = 1 + max((level[d] for d in run.depends if d in level), default=-1)
    out: list[list[Run]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for run in runs:
        out[level[run.key]].append(run)
    return out


def write_slurm_scripts(
    runs: list[Run],
    plan: SweepPlan,
    out_dir: str | Path,
    manifest_arg: str,
    datasets_file: str | Path | None,
    sbatch_options: list[str] | None = None,
    protocol_arg: str | None = None,
) -> list[Path]:
    """Write one job-array script per dependency level and ``submit.sh`` chaining them with ``afterok``.

    Each array task runs one run through ``usclip sweep ... --run KEY`` (skips it if finished, resumes a killed
    ``fit``). ``submit.sh`` submits level 0, captures its job id with ``sbatch --parsable`` and submits level
    ``n`` with ``--dependency=afterok:<job of level n-1>``. Nothing is submitted here. ``protocol_arg`` is the
    sweep's ``--protocol`` value (a protocol, or ``all``), passed on so that every task finds its run.

    Returns:
        The written files, ``submit.sh`` last.
    """
    out = Path(out_dir).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    usable = [r for r in runs if not missing_configs(r, plan)]
    skipped = [r for r in runs if r not in usable]
    bad = {r.key for r in skipped}
    while True:  # runs whose dependencies cannot run cannot run either
        more = [r for r in usable if any(d in bad for d in r.depends)]
        if not more:
            break
        bad |= {r.key for r in more}
        usable = [r for r in usable if r.key not in bad]
    sweep = [sys.executable, "-m", "usclip", "sweep", str(manifest_arg), "--runs-root", str(plan.runs_root)]
    sweep += ["--config-root", str(plan.config_root)]
    if protocol_arg is not None:
        sweep += ["--protocol", protocol_arg]
    if datasets_file is not None:
        sweep += ["--datasets", str(Path(datasets_file).resolve())]
    written: list[Path] = []
    levels = _levels(usable)
    for n, group in enumerate(levels):
        lines = [
            "#!/bin/bash",
            f"#SBATCH --job-name=usclip-sweep-{n}",
            f"#SBATCH --array=0-{len(group) - 1}",
            f"#SBATCH --output={out / 'logs'}/level{n}_%A_%a.out",
            *[f"#SBATCH {opt}" for opt in sbatch_options or []],
            f"# level {n} of {len(levels)}: {len(group)} runs" + (", after level " + str(n - 1) if n else ""),
            "set -euo pipefail",
            f"cd {shlex.quote(str(plan.config_root))}",
            "RUNS=(",
            *[f"  {shlex.quote(r.key)}  # {r.method} | {r.dataset} | seed {r.seed}" for r in group],
            ")",
            f'exec {shlex.join(sweep)} --run "${{RUNS[$SLURM_ARRAY_TASK_ID]}}"',
        ]
        path = out / f"level_{n}.sbatch"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(path)
    submit = [
        "#!/bin/bash",
        "# Submits the sweep's job arrays in dependency order (written by `usclip sweep --launcher slurm`, which",
        "# never submits anything itself).",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
    ]
    for run in skipped:
        submit.append(f"# not submitted (missing config): {run.key}")
    for run in runs:
        if run.key in bad and run not in skipped:
            submit.append(f"# not submitted (needs a run with a missing config): {run.key}")
    for n, group in enumerate(levels):
        dep = f" --dependency=afterok:${{JOB_{n - 1}}}" if n else ""
        submit.append(f"JOB_{n}=$(sbatch --parsable{dep} level_{n}.sbatch)")
        submit.append(f'JOB_{n}="${{JOB_{n}%%;*}}"  # --parsable prints "id" or "id;cluster"')
        submit.append(f'echo "level {n}: job array $JOB_{n} ({len(group)} runs)"')
    path = out / "submit.sh"
    path.write_text("\n".join(submit) + "\n", encoding="utf-8")
    path.chmod(0o755)
    written.append(path)
    return written
