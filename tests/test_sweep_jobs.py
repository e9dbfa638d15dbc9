"""``usclip sweep --jobs N --devices``: runs side by side, run locks, and every state a run can be left in.

Most tests replace the ``usclip`` subprocess with :func:`fake_usclip`, which writes what ``fit`` and ``test`` would
write (checkpoints, adapters, results) and appends every call to ``calls.txt``: the counts of fits and tests are
what the tests check, in milliseconds. Sweeps that are killed or race each other run in forked processes. The
slow test compares real training under ``--jobs 2`` with ``--jobs 1`` (identical metrics files on the CPU).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import yaml

import usclip.reproduce.sweep as sweep_module
from usclip.reproduce import (
    RunFailedError,
    RunLock,
    RunStatus,
    SweepPlan,
    describe_status,
    dry_run_lines,
    expand_runs,
    load_manifest,
    order_runs,
    run_status,
    run_sweep,
)
from usclip.reproduce.locks import LOCK_NAME, LockHeldError, is_stale, read_lock

REPO = Path(__file__).resolve().parents[1]
# a caption run behind an "ft." row, two plain rows; one dataset, one seed (8 runs with two seeds)
FAKE_MANIFEST = {
    "seeds": [1],
    "prerequisites": {
        "cap": {"method": "captions", "dataset": "A", "dir": "captions", "slug": "cap", "subcommands": ["fit"],
                "configs": ["c.yaml"]},
    },
    "tables": [{"table": "table2", "group": "segmentation", "datasets": {"A": {"configs": ["a.yaml"]}},
                "methods": {"M": {}, "N": {}, "M ft.": {"adapter_from": "cap"}}}],
}  # fmt: skip
CAP, M, N, FT = "captions/cap/seed_1", "table2/A/m/seed_1", "table2/A/n/seed_1", "table2/A/m_ft/seed_1"
FORK = multiprocessing.get_context("fork")


def _setup(tmp_path: Path, seeds: list[int] | None = None) -> tuple[list, SweepPlan]:
    for name in ("c", "a"):
        (tmp_path / f"{name}.yaml").write_text("{}\n")
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump({**FAKE_MANIFEST, "seeds": seeds or [1]}, sort_keys=False))
    runs = order_runs(expand_runs(load_manifest(path)))
    return runs, SweepPlan(tmp_path / "runs", {}, tmp_path, str(path))


def _behaviour(runs_root: Path) -> dict:
    path = runs_root.parent / "fake.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def fake_usclip(argv: list[str], log_file: Path, cwd: Path, device: str | None = None) -> int:
    """Stands in for ``usclip fit|test``: writes their files, records the call, fails or hangs where told."""
    value = {a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a.startswith("--")}
    save_dir = Path(value["--trainer.logger.init_args.save_dir"])
    runs_root = next(p for p in save_dir.parents if (p.parent / "manifest.yaml").is_file())
    run_dir = save_dir / value["--trainer.logger.init_args.name"] / value["--trainer.logger.init_args.version"]
    key = run_dir.relative_to(runs_root).as_posix()
    todo = _behaviour(runs_root)
    start = time.monotonic()
    adapters = value.get("--model.init_args.adapter_checkpoint")
    if argv[0] == "fit" and adapters is not None and not Path(adapters).is_file():
        return 3  # started before its caption run finished
    if argv[0] == "fit":
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints" / "last.ckpt").write_text(key)
    hang = todo.get("hang", {})
    if hang.get(key) == argv[0] and not (runs_root.parent / "hung").exists():
        (runs_root.parent / "hung").write_text(str(os.getpid()))
        time.sleep(60)  # killed here
    time.sleep(todo.get("sleep", 0.0))
    if key in todo.get("fail", []) or key in todo.get("exit", {}):
        status = todo.get("exit", {}).get(key, 1)
    elif argv[0] == "fit":
        (run_dir / "checkpoints" / "best.ckpt").write_text(key)
        if key.startswith("captions/"):
            (run_dir / "adapters").mkdir(exist_ok=True)
            (run_dir / "adapters" / "best.safetensors").write_text(key)
        status = 0
    else:
        (run_dir / "results").mkdir(parents=True, exist_ok=True)
        (run_dir / "results" / "test_metrics.json").write_text(json.dumps({"dice": len(key) / 100}))
        status = 0
    resumed = value.get("--ckpt_path") == "last"
    line = [os.getpid(), argv[0], key, device, resumed, status, start, time.monotonic()]
    with (runs_root.parent / "calls.txt").open("a") as handle:  # one write per call: O_APPEND keeps lines whole
        handle.write(json.dumps(line) + "\n")
    return status


def _calls(tmp_path: Path) -> list[dict]:
    path = tmp_path / "calls.txt"
    names = ("pid", "command", "key", "device", "resumed", "status", "start", "end")
    lines = path.read_text().splitlines() if path.is_file() else []
    return [dict(zip(names, json.loads(line), strict=True)) for line in lines]


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(sweep_module, "_run_subprocess", fake_usclip)


def _quiet(line: str) -> None:
    pass


def _sweep_in_child(runs, plan, jobs: int, out: Path, start=None) -> None:
    """A sweep in a forked process: its outcome into ``out`` (JSON); exit 143 on SIGTERM, 1 on a failure."""
    if start is not None:
        start.wait()
    try:
        outcome = run_sweep(runs, plan, echo=_quiet, jobs=jobs, poll_s=0.05)
    except sweep_module.SweepInterruptedError:
        os._exit(143)
    except RunFailedError as err:
        out.write_text(json.dumps(err.outcome))
        os._exit(1)
    out.write_text(json.dumps(outcome))
    os._exit(0)


def _start_sweep_child(runs, plan, jobs: int, out: Path, until):
    """Start :func:`_sweep_in_child` in a forked process and wait (20 s at most) until ``until()`` holds."""
    child = FORK.Process(target=_sweep_in_child, args=(runs, plan, jobs, out))
    child.start()
    deadline = time.monotonic() + 20
    while not until():
        assert child.is_alive() and time.monotonic() < deadline
        time.sleep(0.02)
    return child


# ------------------------------------------------------------------------------------------------- states
def test_run_status_reads_every_state_a_run_can_be_left_in(tmp_path):
    runs, plan = _setup(tmp_path)
    by_key = {r.key: r for r in runs}
    m, ft = by_key[M], by_key[FT]
    run_dir = plan.run_dir(m)
    assert run_status(m, plan) is RunStatus.TODO
    run_dir.mkdir(parents=True)
    (run_dir / "sweep.log").write_text("# fit\n")
    assert run_status(m, plan) is RunStatus.INTERRUPTED  # fit killed before its first checkpoint
    assert describe_status(m, plan, RunStatus.INTERRUPTED) == "interrupted: reruns (no last.ckpt)"
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_text("")
    assert describe_status(m, plan, run_status(m, plan)) == "interrupted: resumes from checkpoints/last.ckpt"
    (run_dir / "sweep_progress.json").write_text('{"completed": 1}')
    assert run_status(m, plan) is RunStatus.FIT_DONE_TEST_MISSING  # fit ended, test never ran or was killed
    (run_dir / "sweep_progress.json").write_text(
        '{"completed": 1, "failed": {"command": "test", "status": 2, "at": "T"}}'
    )
    assert run_status(m, plan) is RunStatus.FAILED
    assert "`usclip test` exited with status 2 at T (the sweep retries it" in describe_status(m, plan, RunStatus.FAILED)
    lock = RunLock(run_dir)
    lock.acquire()  # this process: alive
    assert run_status(m, plan) is RunStatus.LOCKED
    assert describe_status(m, plan, RunStatus.LOCKED).startswith(f"locked: running in {socket.gethostname()} pid ")
    lock.release()
    assert not (run_dir / LOCK_NAME).exists()
    (run_dir / "results").mkdir()
    (run_dir / "results" / "test_metrics.json").write_text("{}")
    assert run_status(m, plan) is RunStatus.DONE
    # dependencies: a failed, blocked or missing one blocks; one not yet run does not
    assert run_status(ft, plan) is RunStatus.TODO
    for dep in (RunStatus.FAILED, RunStatus.BLOCKED, RunStatus.MISSING_CONFIG):
        assert run_status(ft, plan, {CAP: dep}) is RunStatus.BLOCKED
        assert describe_status(ft, plan, RunStatus.BLOCKED, {CAP: dep}) == f"blocked: needs {CAP}"
    assert run_status(ft, plan, {CAP: RunStatus.TODO}) is RunStatus.TODO
    (tmp_path / "c.yaml").unlink()
    assert run_status(by_key[CAP], plan) is RunStatus.MISSING_CONFIG


def test_dry_run_and_slurm_scripts_use_the_same_states(tmp_path):
    runs, plan = _setup(tmp_path)
    cap_dir = plan.run_dir(CAP)
    cap_dir.mkdir(parents=True)
    (cap_dir / "sweep.log").write_text("")
    (cap_dir / "sweep_progress.json").write_text('{"completed": 0, "failed": {"command": "fit", "status": 1}}')
    lines = dry_run_lines(runs, plan)
    head = {line[2:].split(":")[0]: line for line in lines if line.startswith("# captions") or line.startswith("# t")}
    assert "[failed: `usclip fit` exited with status 1" in head[CAP]
    assert head[FT].endswith("seed 1")  # the sweep retries the failed caption run: its dependent is not blocked
    (tmp_path / "c.yaml").unlink()
    lines = dry_run_lines(runs, plan)
    assert f"# {FT}: M ft. | A | seed 1 [blocked: needs {CAP}]" in lines
    written = sweep_module.write_slurm_scripts(runs, plan, tmp_path / "slurm", "m.yaml", None)
    submit = written[-1].read_text()
    assert f"# not submitted (missing config): {CAP}" in submit
    assert f"# not submitted (needs a run with a missing config): {FT}" in submit
    assert [p.name for p in written] == ["level_0.sbatch", "submit.sh"]


# ------------------------------------------------------------------------------------------------- --jobs
def test_jobs_run_side_by_side_on_round_robin_devices_after_their_dependencies(tmp_path, fake):
    runs, plan = _setup(tmp_path, [1, 2])
    (tmp_path / "fake.json").write_text(json.dumps({"sleep": 0.15}))
    lines: list[str] = []
    outcome = run_sweep(runs, plan, echo=lines.append, jobs=2, devices=["0", "1"])
    keys = {r.key for r in runs}
    assert sorted(outcome["ran"]) == sorted(keys) and not any(outcome[k] for k in outcome if k != "ran")
    calls = _calls(tmp_path)
    assert sorted((c["key"], c["command"]) for c in calls) == sorted(
        (r.key, sub) for r in runs for sub in r.subcommands
    )  # every command exactly once
    assert all(c["status"] == 0 for c in calls)  # an "ft." fit never started before its caption run ended
    # two at a time, never three; two running together are on different devices
    events = sorted([(c["start"], 1, c) for c in calls] + [(c["end"], -1, c) for c in calls], key=lambda e: e[:2])
    running: list[dict] = []
    most = 0
    for _, step, call in events:
        running = [*running, call] if step == 1 else [c for c in running if c is not call]
        most = max(most, len(running))
        assert len({c["device"] for c in running}) == len(running)
    assert most == 2
    assert {c["device"] for c in calls} == {"0", "1"}
    cap_end = {c["key"]: c["end"] for c in calls if c["key"].startswith("captions/")}
    for call in calls:
        if "m_ft" in call["key"]:
            assert call["start"] >= cap_end[call["key"].replace("table2/A/m_ft", "captions/cap")]
    assert any("running (M, A, seed 1) on device" in line for line in lines)
    assert "(CUDA_VISIBLE_DEVICES=" in (plan.run_dir(M) / "sweep.log").read_text()
    assert not list((tmp_path / "runs").rglob(LOCK_NAME))  # every lock released


def test_a_failed_dependency_blocks_its_dependents_and_the_others_run(tmp_path, fake):
    runs, plan = _setup(tmp_path)
    (tmp_path / "fake.json").write_text(json.dumps({"fail": [CAP]}))
    lines: list[str] = []
    with pytest.raises(RunFailedError, match=rf"run {CAP} \(captions, A, seed 1\) failed: `usclip fit` exited") as err:
        run_sweep(runs, plan, echo=lines.append, jobs=2)
    outcome = err.value.outcome
    assert outcome["failed"] == [CAP] and outcome["blocked"] == [FT] and sorted(outcome["ran"]) == [M, N]
    assert any(line.endswith(f"{FT}: blocked: needs {CAP}") for line in lines)
    assert not any(c["key"] == FT for c in _calls(tmp_path))
    by_key = {r.key: r for r in runs}
    assert run_status(by_key[CAP], plan) is RunStatus.FAILED
    # fixed and started again: the failed run and its dependent run, the finished ones are skipped
    (tmp_path / "fake.json").write_text("{}")
    outcome = run_sweep(runs, plan, echo=_quiet, jobs=2)
    assert sorted(outcome["ran"]) == [CAP, FT] and sorted(outcome["done"]) == [M, N]
    assert run_status(by_key[CAP], plan) is RunStatus.DONE


def test_a_finished_fit_whose_test_is_missing_runs_the_test_only(tmp_path, fake):
    runs, plan = _setup(tmp_path)
    m = next(r for r in runs if r.key == M)
    run_sweep([m], plan, echo=_quiet)
    (plan.run_dir(m) / "results" / "test_metrics.json").unlink()  # as if the test never ran
    (plan.run_dir(m) / "sweep_progress.json").write_text('{"completed": 1}')
    assert run_status(m, plan) is RunStatus.FIT_DONE_TEST_MISSING
    assert run_sweep([m], plan, echo=_quiet)["ran"] == [M]
    assert [c["command"] for c in _calls(tmp_path)] == ["fit", "test", "test"]


# ---------------------------------------------------------------------------------------- killed sweeps, locks
@pytest.mark.parametrize("phase", ["fit", "test"])
def test_a_killed_sweep_leaves_a_stale_lock_that_the_next_sweep_takes_over(tmp_path, fake, phase, caplog):
    runs, plan = _setup(tmp_path)
    m = next(r for r in runs if r.key == M)
    (tmp_path / "fake.json").write_text(json.dumps({"hang": {M: phase}}))
    child = _start_sweep_child([m], plan, 1, tmp_path / "out.json", until=(tmp_path / "hung").exists)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    lock = read_lock(plan.run_dir(m) / LOCK_NAME)
    assert lock is not None and lock.pid == child.pid and is_stale(lock)  # left behind, its holder dead
    expected = RunStatus.INTERRUPTED if phase == "fit" else RunStatus.FIT_DONE_TEST_MISSING
    assert run_status(m, plan) is expected
    with caplog.at_level("WARNING"):
        assert run_sweep([m], plan, echo=_quiet)["ran"] == [M]
    assert f"took over the stale lock of {socket.gethostname()} pid {child.pid}" in caplog.text
    calls = [(c["command"], c["resumed"]) for c in _calls(tmp_path)]
    # the killed fit resumes from its last.ckpt (--ckpt_path last); a killed test reruns alone
    assert calls == ([("fit", True), ("test", False)] if phase == "fit" else [("fit", False), ("test", False)])
    assert "resume: usclip fit" in (plan.run_dir(m) / "sweep.log").read_text() or phase == "test"
    assert run_status(m, plan) is RunStatus.DONE and not (plan.run_dir(m) / LOCK_NAME).exists()


def test_sigterm_releases_the_lock_and_the_run_stays_resumable(tmp_path, fake):
    runs, plan = _setup(tmp_path)
    m = next(r for r in runs if r.key == M)
    (tmp_path / "fake.json").write_text(json.dumps({"hang": {M: "fit"}}))
    child = _start_sweep_child([m], plan, 1, tmp_path / "out.json", until=(tmp_path / "hung").exists)
    os.kill(child.pid, signal.SIGTERM)
    child.join(timeout=20)
    assert child.exitcode == 143
    assert not (plan.run_dir(m) / LOCK_NAME).exists()
    assert run_status(m, plan) is RunStatus.INTERRUPTED  # not "failed": it was stopped


def test_a_live_lock_is_not_taken_and_another_hosts_lock_goes_stale_after_the_configured_age(tmp_path):
    run_dir = tmp_path / "run"
    held = rf"{run_dir} is being run by {socket.gethostname()} pid {os.getpid()}"
    with RunLock(run_dir), pytest.raises(LockHeldError, match=held):
        RunLock(run_dir).acquire()
    run_dir.joinpath(LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "T", "token": "x"}))
    with pytest.raises(LockHeldError, match="elsewhere pid 1 since T"):
        RunLock(run_dir, stale_after=60).acquire()
    old = time.time() - 120
    os.utime(run_dir / LOCK_NAME, (old, old))  # no refresh for 2 minutes
    mine = RunLock(run_dir, stale_after=60)
    mine.acquire()
    assert read_lock(run_dir / LOCK_NAME).token == mine.token
    mine.release()
    assert sorted(p.name for p in run_dir.iterdir()) == []  # the stale lock moved aside and removed


def test_two_sweeps_racing_for_the_same_runs_run_each_once(tmp_path, fake):
    runs, plan = _setup(tmp_path, [1, 2])
    (tmp_path / "fake.json").write_text(json.dumps({"sleep": 0.05}))
    start = FORK.Event()
    children = [
        FORK.Process(target=_sweep_in_child, args=(runs, plan, 2, tmp_path / f"out{i}.json", start)) for i in (0, 1)
    ]
    for child in children:
        child.start()
    start.set()
    for child in children:
        child.join(timeout=60)
    assert [c.exitcode for c in children] == [0, 0]
    calls = _calls(tmp_path)
    commands = sorted((c["key"], c["command"]) for c in calls)
    assert commands == sorted((r.key, sub) for r in runs for sub in r.subcommands)  # each once, none missing
    outcomes = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in (0, 1)]
    ran = [set(o["ran"]) for o in outcomes]
    assert not ran[0] & ran[1] and ran[0] | ran[1] == {r.key for r in runs}
    for outcome in outcomes:  # each sweep ends with every run done: by itself or by the other
        assert set(outcome["ran"]) | set(outcome["done"]) == {r.key for r in runs}
    assert all(run_status(r, plan) is RunStatus.DONE for r in runs)
    assert not list((tmp_path / "runs").rglob(LOCK_NAME + "*"))


# ------------------------------------------------------------------------------------------- real training
def _two_run_manifest(tmp_path: Path) -> Path:
    tiny = yaml.safe_load((REPO / "tests" / "conf" / "manifests" / "sweep_tiny.yaml").read_text())
    tiny.pop("prerequisites")
    table = tiny["tables"][0]
    table["datasets"] = {"A": table["datasets"]["A"]}
    table["methods"] = {"CLIP (Mona)": {}, "CLIP (LoRA)": table["methods"]["CLIP (LoRA)"]}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({**tiny, "seeds": [1]}))
    return path


@pytest.mark.slow
def test_jobs_2_gives_the_metrics_of_jobs_1_on_the_cpu(tmp_path, capsys):
    # the tiny manifest's two A runs (fit + test each) in usclip subprocesses, one after another and side by side;
    # the fast twin is test_jobs_run_side_by_side_on_round_robin_devices_after_their_dependencies
    from usclip.cli import main
    from usclip.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "A", num_samples=24, size=96, seed=0)
    (tmp_path / "datasets.yaml").write_text(f"A: {tmp_path / 'A'}\n")
    manifest = _two_run_manifest(tmp_path)
    for jobs in (1, 2):
        args = ["sweep", str(manifest), "--datasets", str(tmp_path / "datasets.yaml"), "--config-root", str(REPO),
                "--runs-root", str(tmp_path / f"jobs{jobs}"), "--jobs", str(jobs)]  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 0
        assert "ran: 2, done: 0, missing: 0, blocked: 0, failed: 0" in capsys.readouterr().out
    one = sorted((tmp_path / "jobs1").rglob("test_metrics.json"))
    two = sorted((tmp_path / "jobs2").rglob("test_metrics.json"))
    assert [p.relative_to(tmp_path / "jobs1") for p in one] == [p.relative_to(tmp_path / "jobs2") for p in two]
    assert len(one) == 2
    for a, b in zip(one, two, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.relative_to(tmp_path / "jobs1")


def test_sigterm_stops_the_running_usclip_processes_of_every_job(tmp_path, monkeypatch):
    # the real subprocess path with --jobs 2: `usclip` replaced by a Python that records its pid and sleeps
    runs, plan = _setup(tmp_path)
    hang = "import os, pathlib, time; pathlib.Path(f'started-{os.getpid()}').write_text(''); time.sleep(60)"
    monkeypatch.setattr(sweep_module, "_USCLIP", [sys.executable, "-c", hang])
    plain = [r for r in runs if r.key in (M, N)]
    child = _start_sweep_child(
        plain, plan, 2, tmp_path / "out.json", until=lambda: len(list(tmp_path.glob("started-*"))) >= 2
    )
    pids = [int(p.name.split("-")[1]) for p in tmp_path.glob("started-*")]
    os.kill(child.pid, signal.SIGTERM)
    child.join(timeout=20)
    assert child.exitcode == 143
    for pid in pids:  # terminated and reaped by the sweep
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    for run in plain:
        assert not (plan.run_dir(run) / LOCK_NAME).exists()
        assert run_status(run, plan) is RunStatus.INTERRUPTED


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--jobs", "0"], "--jobs expects a whole number of runs at a time, at least 1; got '0'"),
        (["--devices", ","], "--devices expects device ids like '0,1', got ','"),
        (["--jobs", "2", "--in-process"], "--in-process runs one run at a time: drop --jobs and --devices"),
        (["--lock-stale-after", "0"], "--lock-stale-after expects a positive number of seconds, got 0.0"),
    ],
)
def test_sweep_options_reject_bad_values_naming_them(tmp_path, capsys, args, message):
    from usclip.commands.sweep import main

    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "m.yaml"), *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_requeued_slurm_job_takes_over_its_earlier_incarnations_lock(tmp_path, monkeypatch, fake):
    runs, plan = _setup(tmp_path)
    m = next(r for r in runs if r.key == M)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    # the first incarnation: its fit was requeued (exit 75, usclip.callbacks.EXIT_REQUEUED)
    (tmp_path / "fake.json").write_text(json.dumps({"exit": {M: 75}}))
    with pytest.raises(RunFailedError, match="exited with status 75"):
        run_sweep([m], plan, echo=_quiet)
    assert run_status(m, plan) is RunStatus.INTERRUPTED  # not "failed": it resumes
    # ... and was killed on another node, its lock fresh
    body = {"host": "node-a", "pid": 1, "started": "T", "token": "x", "slurm_job": "77_3", "slurm_restart": 0}
    (plan.run_dir(m) / LOCK_NAME).write_text(json.dumps(body))
    assert run_status(m, plan) is RunStatus.LOCKED  # the same job, not yet restarted: alive as far as we know
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert run_status(m, plan) is RunStatus.INTERRUPTED
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")  # another task of the array: not its lock
    assert run_status(m, plan) is RunStatus.LOCKED
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    (tmp_path / "fake.json").write_text("{}")
    assert run_sweep([m], plan, echo=_quiet)["ran"] == [M]
    assert [(c["command"], c["resumed"]) for c in _calls(tmp_path)] == [("fit", False), ("fit", True), ("test", False)]
