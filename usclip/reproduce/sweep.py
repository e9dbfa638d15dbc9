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
import enum
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from usclip._io import write_text_atomic
from usclip.packaged_configs import resolve_config
from usclip.reproduce.locks import (
    DEFAULT_STALE_AFTER_S,
    LOCK_NAME,
    Heartbeat,
    LockHeldError,
    RunLock,
    is_stale,
    read_lock,
)
from usclip.reproduce.manifest import PLACEHOLDER, ManifestError, Run

log = logging.getLogger(__name__)

__all__ = [
    "BLOCKING",
    "RUNNABLE",
    "RunFailedError",
    "RunStatus",
    "SweepInterruptedError",
    "SweepPlan",
    "build_commands",
    "describe_status",
    "dry_run_lines",
    "execute_run",
    "is_done",
    "missing_configs",
    "run_status",
    "run_sweep",
    "write_slurm_scripts",
]


class RunFailedError(RuntimeError):
    """A command of a run exited with an error; the message names the run and its log file.

    Attributes:
        outcome: :func:`run_sweep`'s outcome by run key (``ran``, ``done``, ..., ``failed``), when it raised this.
    """

    def __init__(self, message: str, outcome: dict[str, list[str]] | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome or {}


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


def _progress_record(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((run_dir / "sweep_progress.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _progress(run_dir: Path) -> int:
    try:
        return int(_progress_record(run_dir).get("completed", 0))
    except (ValueError, TypeError):
        return 0


def is_done(run: Run, plan: SweepPlan) -> bool:
    """Whether the run finished: test results written (runs that test) or every command finished."""
    run_dir = plan.run_dir(run)
    if "test" in run.subcommands and (run_dir / "results" / "test_metrics.json").is_file():
        return True
    return _progress(run_dir) >= len(run.subcommands)


class RunStatus(str, enum.Enum):
    """Where a run stands; :func:`run_status` decides it, for the sweep, its dry run and the SLURM writer alike.

    - ``missing_config``: a config file of the run does not exist (it cannot run).
    - ``blocked``: a dependency cannot run or failed in this sweep (missing config, blocked, failed).
    - ``done``: test results written (runs that test) or every command finished; skipped.
    - ``locked``: another live sweep holds the run's lock (:mod:`usclip.reproduce.locks`); waited for.
    - ``failed``: the last attempt's command exited with an error (``sweep_progress.json``); a new sweep retries it.
    - ``fit_done_test_missing``: ``fit`` finished, ``test`` did not (never started, or killed): the test runs alone.
    - ``interrupted``: a command started and never ended (killed): a ``fit`` resumes from ``checkpoints/last.ckpt``
      (``--ckpt_path last``) or, without one, reruns from the start with the old checkpoints moved aside.
    - ``todo``: nothing started.
    """

    MISSING_CONFIG = "missing_config"
    BLOCKED = "blocked"
    DONE = "done"
    LOCKED = "locked"
    FAILED = "failed"
    FIT_DONE_TEST_MISSING = "fit_done_test_missing"
    INTERRUPTED = "interrupted"
    TODO = "todo"


#: dependency states that block a run
BLOCKING = frozenset({RunStatus.MISSING_CONFIG, RunStatus.BLOCKED, RunStatus.FAILED})
#: states in which a sweep starts (or continues) the run
RUNNABLE = frozenset({RunStatus.TODO, RunStatus.INTERRUPTED, RunStatus.FIT_DONE_TEST_MISSING, RunStatus.FAILED})


def run_status(
    run: Run,
    plan: SweepPlan,
    settled: Mapping[str, RunStatus] | None = None,
    stale_after: float = DEFAULT_STALE_AFTER_S,
) -> RunStatus:
    """The run's :class:`RunStatus`, read from its folder (progress, results, lock) and its dependencies' states.

    Args:
        run: the run.
        plan: where its folder is.
        settled: states the caller already decided for other runs (its dependencies among them); a dependency in
            :data:`BLOCKING` blocks the run. Dependencies not in it do not block (they run first).
        stale_after: seconds after which another host's lock counts as stale (:mod:`usclip.reproduce.locks`).
    """
    if missing_configs(run, plan):
        return RunStatus.MISSING_CONFIG
    settled = settled or {}
    if any(settled.get(d) in BLOCKING for d in run.depends):
        return RunStatus.BLOCKED
    if is_done(run, plan):
        return RunStatus.DONE
    run_dir = plan.run_dir(run)
    lock = read_lock(run_dir / LOCK_NAME)
    if lock is not None and not is_stale(lock, stale_after):
        return RunStatus.LOCKED
    record = _progress_record(run_dir)
    if record.get("failed"):
        return RunStatus.FAILED
    completed = _progress(run_dir)
    if 0 < completed < len(run.subcommands) and run.subcommands[completed] == "test":
        return RunStatus.FIT_DONE_TEST_MISSING
    if (run_dir / "sweep.log").is_file():
        return RunStatus.INTERRUPTED
    return RunStatus.TODO


def describe_status(
    run: Run, plan: SweepPlan, status: RunStatus, settled: Mapping[str, RunStatus] | None = None
) -> str:
    """One line on why the run is in ``status`` (the configs missing, the dependencies blocking, the lock holder)."""
    run_dir = plan.run_dir(run)
    if status is RunStatus.MISSING_CONFIG:
        return "missing: " + ", ".join(missing_configs(run, plan))
    if status is RunStatus.BLOCKED:
        return "blocked: needs " + ", ".join(d for d in run.depends if (settled or {}).get(d) in BLOCKING)
    if status is RunStatus.DONE:
        return "finished"
    if status is RunStatus.LOCKED:
        info = read_lock(run_dir / LOCK_NAME)
        return f"locked: running in {info.describe() if info else 'another sweep'}"
    if status is RunStatus.FAILED:
        failed = _progress_record(run_dir).get("failed") or {}
        return (
            f"failed: `usclip {failed.get('command', '?')}` exited with status {failed.get('status', '?')} at "
            f"{failed.get('at', '?')} (the sweep retries it; log: {run_dir / 'sweep.log'})"
        )
    if status is RunStatus.FIT_DONE_TEST_MISSING:
        return "fit finished, test not: the sweep runs the test"
    if status is RunStatus.INTERRUPTED:
        resume = (run_dir / "checkpoints" / "last.ckpt").is_file()
        return "interrupted: " + ("resumes from checkpoints/last.ckpt" if resume else "reruns (no last.ckpt)")
    return ""


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


def _run_in_process(argv: list[str], log_file: Path, cwd: Path, device: str | None = None) -> int:
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


class SweepInterruptedError(BaseException):
    """The sweep got SIGTERM: its children were stopped and its locks released.

    A ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception`` of a run swallows it.
    """


# the usclip subprocesses running now, to stop on SIGTERM; _STOPPING: runs ending now were stopped, not failed
_CHILDREN: set[subprocess.Popen[bytes]] = set()
_CHILDREN_LOCK = threading.Lock()
_STOPPING = threading.Event()


#: the exit status of a ``fit`` that SLURM requeued (``usclip.callbacks.EXIT_REQUEUED``; not imported: Lightning)
_EXIT_REQUEUED = 75
#: how a subprocess runs ``usclip`` (tests replace it with a stand-in)
_USCLIP = [sys.executable, "-m", "usclip"]


def _run_subprocess(argv: list[str], log_file: Path, cwd: Path, device: str | None = None) -> int:
    env = None if device is None else {**os.environ, "CUDA_VISIBLE_DEVICES": device}
    with log_file.open("a", encoding="utf-8") as handle:
        handle.flush()
        with _CHILDREN_LOCK:
            if _STOPPING.is_set():
                raise SweepInterruptedError("stopping")
            proc = subprocess.Popen([*_USCLIP, *argv], cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, env=env)
            _CHILDREN.add(proc)
        try:
            return proc.wait()
        finally:
            with _CHILDREN_LOCK:
                _CHILDREN.discard(proc)


def _stop_children(grace_s: float = 30.0) -> None:
    with _CHILDREN_LOCK:
        _STOPPING.set()
        children = list(_CHILDREN)
    for proc in children:
        with contextlib.suppress(OSError):
            proc.terminate()
    for proc in children:
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()


def _write_progress(run_dir: Path, completed: int, failed: dict[str, Any] | None = None) -> None:
    record: dict[str, Any] = {"completed": completed}
    if failed:
        record["failed"] = failed
    write_text_atomic(run_dir / "sweep_progress.json", json.dumps(record) + "\n")


def execute_run(run: Run, plan: SweepPlan, in_process: bool = False, device: str | None = None) -> None:
    """Run the run's commands that have not finished yet, one after another.

    A ``fit`` whose ``checkpoints/last.ckpt`` exists continues from it (``--ckpt_path last``); one killed before
    its first ``last.ckpt`` reruns from the start (its old ``checkpoints`` moved aside). The caller holds the run's
    lock (:func:`run_sweep` does).

    Args:
        run: the run.
        plan: folders and datasets.
        in_process: run the commands in this process (tests, debugging) instead of a subprocess each.
        device: ``CUDA_VISIBLE_DEVICES`` for the subprocesses (``None``: inherited).

    Raises:
        RunFailedError: a command exited with an error (names the run, the command and ``sweep.log``); recorded in
            ``sweep_progress.json`` (state ``failed``).
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
        _write_progress(run_dir, i)  # clears an earlier attempt's failure: this command is running now
        on = f" (CUDA_VISIBLE_DEVICES={device})" if device is not None else ""
        with log_file.open("a", encoding="utf-8") as handle:
            handle.write(f"# {stamp} {'resume: ' if resumed else ''}{shlex.join(['usclip', *argv])}{on}\n")
        log.info("%s: usclip %s%s", run.key, argv[0], " (resuming from last.ckpt)" if resumed else "")
        runner = _run_in_process if in_process else _run_subprocess
        status = runner(argv, log_file, plan.config_root, device)
        if status != 0:
            if _STOPPING.is_set():
                raise SweepInterruptedError(f"{run.key}: stopped")
            if status != _EXIT_REQUEUED:  # requeued by SLURM: interrupted (resumes), not failed
                _write_progress(run_dir, i, {"command": argv[0], "status": status, "at": stamp})
            raise RunFailedError(
                f"run {run.key} ({run.method}, {run.dataset}, seed {run.seed}) failed: `usclip {argv[0]}` exited with "
                f"status {status}; see {log_file}"
            )
        _write_progress(run_dir, i + 1)


def _on_sigterm(signum: int, frame: object) -> None:
    raise SweepInterruptedError(f"signal {signum}")


def _inline(fn: Callable[[], None]) -> Future[None]:
    """Run ``fn`` now and return its outcome as a finished future (``--jobs 1``: runs in this thread)."""
    future: Future[None] = Future()
    try:
        fn()
        future.set_result(None)
    except Exception as err:  # the scheduler reads it from the future, as from a worker thread's
        future.set_exception(err)
    return future


def run_sweep(
    runs: list[Run],
    plan: SweepPlan,
    in_process: bool = False,
    echo: Callable[[str], None] = print,
    known: dict[str, Run] | None = None,
    jobs: int = 1,
    devices: Sequence[str] | None = None,
    stale_after: float = DEFAULT_STALE_AFTER_S,
    poll_s: float = 5.0,
) -> dict[str, list[str]]:
    """Run ``runs`` locally, ``jobs`` at a time, each after its dependencies, each under its folder's lock.

    The scheduler is hand-written (a thread per running run, each thread waiting on its ``usclip`` subprocess):
    Lightning runs one training, and none of the chosen dependencies schedules a dependency graph of processes.
    Runs start in the given order as slots free up; run slot ``k`` gets device ``devices[k % len(devices)]``
    (``CUDA_VISIBLE_DEVICES``), so each device holds ``jobs / len(devices)`` runs. Every run goes through
    :func:`run_status`: finished runs are skipped, a run locked by another live sweep is waited for (and skipped if
    that sweep finished it), a failed run's dependents are blocked while the other runs go on. SIGTERM stops the
    running commands, releases the locks and raises :class:`SweepInterruptedError`; the next sweep continues.

    Args:
        runs: the runs, dependencies first (:func:`usclip.reproduce.select_runs`).
        plan: folders and datasets.
        in_process: run the ``usclip`` commands in this process instead of one subprocess each (tests, debugging;
            ``jobs`` must be 1 and ``devices`` empty).
        echo: where progress lines go.
        known: every run of the manifest by key, to check dependencies outside ``runs`` (``--run KEY``).
        jobs: runs at a time.
        devices: device ids to spread the runs over (``None``: every run sees the devices this process sees).
        stale_after: seconds after which another host's lock is taken over (:mod:`usclip.reproduce.locks`).
        poll_s: seconds between looks at runs locked by another sweep.

    Returns:
        Run keys by outcome: ``ran``, ``done`` (finished before, or by another sweep meanwhile), ``missing`` (a
        config file is missing), ``blocked`` (a dependency is missing, blocked or failed), ``failed``.

    Raises:
        RunFailedError: after the other runs ended, if a run failed (its message, and ``outcome``, the returned dict).
        SweepInterruptedError: SIGTERM (or Ctrl-C as ``KeyboardInterrupt``): children stopped, locks released.
        ValueError: ``jobs`` below 1, or ``in_process`` with several jobs or with devices.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    if in_process and (jobs > 1 or devices):
        raise ValueError(f"in_process runs one run at a time on this process's devices: got jobs={jobs}, {devices=}")
    outcome: dict[str, list[str]] = {"ran": [], "done": [], "missing": [], "blocked": [], "failed": []}
    known = known or {}
    selected = {r.key for r in runs}
    pending = list(runs)
    settled: dict[str, RunStatus] = {}
    held: dict[str, RunLock] = {}
    active: dict[Future[None], tuple[Run, int]] = {}
    free = list(range(jobs))
    waiting: set[str] = set()
    failures: list[str] = []
    number = {r.key: n for n, r in enumerate(runs, 1)}

    def label(run: Run) -> str:
        return f"[{number[run.key]}/{len(runs)}] {run.key}"

    def settle(run: Run, status: RunStatus, kind: str, line: str) -> None:
        settled[run.key] = status
        outcome[kind].append(run.key)
        pending.remove(run)
        echo(f"{label(run)}: {line}")

    _STOPPING.clear()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    heartbeat = Heartbeat(held.values(), stale_after / 4)
    executor = ThreadPoolExecutor(jobs, thread_name_prefix="usclip-sweep") if jobs > 1 else None
    try:
        while pending or active:
            for run in list(pending):
                if any(d in selected and d not in settled for d in run.depends):
                    continue  # a dependency has not ended yet
                status = run_status(run, plan, settled, stale_after)
                if status in (RunStatus.MISSING_CONFIG, RunStatus.BLOCKED):
                    kind = "missing" if status is RunStatus.MISSING_CONFIG else "blocked"
                    settle(run, status, kind, describe_status(run, plan, status, settled))
                    continue
                if status is RunStatus.DONE:
                    by = "by another sweep" if run.key in waiting else "before"
                    settle(run, status, "done", f"finished {by}, skipped")
                    continue
                if status is RunStatus.LOCKED:
                    if run.key not in waiting:
                        waiting.add(run.key)
                        echo(f"{label(run)}: {describe_status(run, plan, status)}; waiting for it")
                    continue
                outside = [d for d in run.depends if d not in selected and not (d in known and is_done(known[d], plan))]
                if outside:
                    failures.append(
                        f"run {run.key} needs {outside}, which have not finished; run the sweep without --run (or with "
                        "--only selecting them) first"
                    )
                    settle(run, RunStatus.FAILED, "failed", f"needs {outside}, which have not finished")
                    continue
                if not free:
                    continue
                lock = RunLock(plan.run_dir(run), stale_after)
                try:
                    lock.acquire()
                except LockHeldError:
                    continue  # taken by another sweep since run_status looked: locked on the next pass
                if is_done(run, plan):  # finished by another sweep between run_status and the lock
                    lock.release()
                    settle(run, RunStatus.DONE, "done", "finished by another sweep, skipped")
                    continue
                held[run.key] = lock
                slot = free.pop(0)
                device = devices[slot % len(devices)] if devices else None
                note = "" if status is RunStatus.TODO else f"; {describe_status(run, plan, status)}"
                on = f" on device {device}" if device is not None else ""
                echo(f"{label(run)}: running ({run.method}, {run.dataset}, seed {run.seed}){on}{note}; log: "
                     f"{plan.run_dir(run) / 'sweep.log'}")  # fmt: skip
                pending.remove(run)

                def job(run: Run = run, device: str | None = device) -> None:
                    execute_run(run, plan, in_process=in_process, device=device)

                future = executor.submit(job) if executor is not None else _inline(job)
                active[future] = (run, slot)
                if executor is None:
                    break  # --jobs 1: settle it before looking at the next run
            if active:
                finished, _ = wait(list(active), timeout=poll_s if waiting else None, return_when=FIRST_COMPLETED)
                for future in finished:
                    run, slot = active.pop(future)
                    free.append(slot)
                    free.sort()
                    held.pop(run.key).release()
                    err = future.exception()
                    if err is None:
                        settled[run.key] = RunStatus.DONE
                        outcome["ran"].append(run.key)
                        echo(f"{label(run)}: finished")
                    elif isinstance(err, RunFailedError):
                        settled[run.key] = RunStatus.FAILED
                        outcome["failed"].append(run.key)
                        failures.append(str(err))
                        echo(f"{label(run)}: failed; its dependents are blocked ({err})")
                    else:
                        raise err
            elif pending:
                time.sleep(poll_s)  # only runs locked by other sweeps are left: wait for them
    finally:
        if active:
            _stop_children()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        for lock in held.values():
            lock.release()
        heartbeat.stop()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    if failures:
        raise RunFailedError("\n".join(failures), outcome)
    return outcome


def dry_run_lines(runs: list[Run], plan: SweepPlan, dependencies: list[Run] | None = None) -> list[str]:
    """The sweep as a shell script: a ``#`` line per run (with its :func:`run_status`), then its commands."""
    protocols = list(dict.fromkeys(r.protocol for r in runs if r.protocol is not None))
    under = f" (protocol {', '.join(protocols)})" if protocols else ""
    lines = [f"# usclip sweep {plan.manifest}{under}: {len(runs)} runs; run from {plan.config_root}"]
    if plan.datasets is None:
        lines.append("# no --datasets file: ${NAME} stands for the folder of dataset NAME")
    extra = {r.key for r in dependencies or []}
    settled: dict[str, RunStatus] = {}
    for run in runs:
        status = run_status(run, plan, settled)
        # a run that failed before is retried by the sweep: its dependents are not blocked by it
        settled[run.key] = RunStatus.TODO if status is RunStatus.FAILED else status
        text = describe_status(run, plan, status, settled)
        why = " (dependency of the selection)" if run.key in extra else ""
        head = f"# {run.key}: {run.method} | {run.dataset} | seed {run.seed}{why}"
        lines.append(head + (f" [{text}]" if text else ""))
        if run.note:
            lines.append(f"#   note: {run.note}")
        if status in (RunStatus.MISSING_CONFIG, RunStatus.BLOCKED):
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
    settled: dict[str, RunStatus] = {}
    for run in runs:  # dependency order; a run that failed before is retried by its task: it blocks nothing
        status = run_status(run, plan, settled)
        settled[run.key] = RunStatus.TODO if status is RunStatus.FAILED else status
    skipped = [r for r in runs if settled[r.key] is RunStatus.MISSING_CONFIG]
    bad = {r.key for r in runs if settled[r.key] in (RunStatus.MISSING_CONFIG, RunStatus.BLOCKED)}
    usable = [r for r in runs if r.key not in bad]
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
