"""Preemption and mid-epoch resume (issue #18): step checkpoints, SLURM's requeue signal, the sampler's skip.

The end-to-end tests run the real ``usclip fit`` (tiny segmentation config of tests/test_reliability.py, LoRA with
dropout so that the random state matters) as a subprocess, interrupt it in the middle of an epoch (SIGKILL right after
a step checkpoint; SIGUSR1 under a faked SLURM job), continue it, and compare every weight and the test metrics with
one uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import Callback

from tests.test_reliability import _args, _env, _restore_determinism, _test_metrics  # noqa: F401 (autouse fixture)
from usclip._resume import find_requeued_run, prepare_subcommand
from usclip.callbacks import EXIT_REQUEUED, SLURM_MARKER, MidEpochCheckpoint
from usclip.cli import main
from usclip.data.samplers import EpochSampler, resume_sampler, training_position

# 3 epochs of 3 steps; LoRA dropout 0.1: a resume that drew other dropout masks would end with other weights
TRAIN = (
    "--trainer.max_epochs=3",
    "--trainer.limit_train_batches=3",
    "--trainer.deterministic=true",
    '--model.init_args.adapter_kwargs={"dropout": 0.1}',
)
JOB = "4242"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True, map_location="cpu")["state_dict"]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: final weights and test metrics."""
    tmp = tmp_path_factory.mktemp("reference")
    cli = main(["fit", *_args(tmp, "straight", *TRAIN)])
    assert cli.trainer.global_step == 9
    last = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    try:
        metrics = _test_metrics(tmp, "straight", last)
    finally:
        torch.use_deterministic_algorithms(False)
    return _weights(last), metrics


class Killed(Exception):
    """Stands for a kill in the in-process tests (the slow twins SIGKILL a real process)."""


class KillAtStep(Callback):
    """Kill the run at the start of the batch beginning at global step ``step``: SIGKILL, or raise :class:`Killed`."""

    def __init__(self, step: int, sigkill: bool = True) -> None:
        self.step = step
        self.sigkill = sigkill

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        if self.sigkill:
            os.kill(os.getpid(), signal.SIGKILL)
        raise Killed(f"step {self.step}")


class SignalAtStep(Callback):
    """At global step ``step``: touch ``marker`` and wait for the requeue signal, or send it to this process."""

    def __init__(self, step: int, marker: str | None = None) -> None:
        self.step = step
        self.marker = marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        watcher = next(c for c in trainer.callbacks if isinstance(c, MidEpochCheckpoint))
        if self.marker is None:
            os.kill(os.getpid(), signal.SIGUSR1)
        else:
            Path(self.marker).write_text(f"{trainer.current_epoch} {batch_idx}")
        deadline = time.monotonic() + 120
        while not watcher.signalled and time.monotonic() < deadline:
            time.sleep(0.05)


def _callbacks(cls: type, **init_args) -> str:
    spec = [{"class_path": f"tests.test_preemption.{cls.__name__}", "init_args": init_args}]
    return "--trainer.callbacks=" + json.dumps(spec)


def _assert_continued_like_the_uninterrupted_run(tmp_path: Path, name: str, cli, reference) -> None:
    run = tmp_path / "runs" / name / "version_0"
    assert Path(cli.trainer.log_dir) == run  # the same run folder
    assert cli.trainer.global_step == 9 and cli.trainer.current_epoch == 3
    weights, metrics = reference
    _assert_same_weights(weights, _weights(run / "checkpoints" / "last.ckpt"))
    assert _test_metrics(tmp_path, name, run / "checkpoints" / "last.ckpt") == metrics


# ----------------------------------------------------------------------------------------------- step checkpoints
# checkpoints every 2 steps: global step 2 (epoch 0, batch 1) and 4 (epoch 1, batch 0); killed at the start of step 5
# (epoch 1, batch 2): last.ckpt holds epoch 1 after its first batch, and the work of batch 1 of epoch 1 is lost
STEPS = "--model.init_args.checkpoint_every_n_steps=2"


def _assert_step_checkpoint(run: Path) -> None:
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert (saved["epoch"], saved["global_step"]) == (1, 4)
    position = saved["SegmentationDataModule"]["train_position"]
    assert position == {"epoch": 1, "batches": 1, "batch_size": 4, "global_step": 4}


@pytest.mark.parametrize(
    "workers",
    [0, pytest.param(2, marks=pytest.mark.slow)],  # with workers the loader draws keys when its iterator is made
)
def test_interrupted_after_a_step_checkpoint_resumes_at_the_next_batch_bit_for_bit(tmp_path, reference, workers):
    args = _args(tmp_path, "killed", *TRAIN, STEPS, f"--data.init_args.num_workers={workers}")
    with pytest.raises(Killed):
        main(["fit", *args, _callbacks(KillAtStep, step=5, sigkill=False)])
    _assert_step_checkpoint(tmp_path / "runs" / "killed" / "version_0")
    resumed = main(["fit", *args, "--ckpt_path=last"])
    _assert_continued_like_the_uninterrupted_run(tmp_path, "killed", resumed, reference)


@pytest.mark.slow  # fast twin: test_interrupted_after_a_step_checkpoint_resumes_at_the_next_batch_bit_for_bit
def test_sigkill_after_a_step_checkpoint_resumes_at_the_next_batch_bit_for_bit(tmp_path, reference):
    args = _args(tmp_path, "killed", *TRAIN, STEPS)
    cmd = [sys.executable, "-m", "usclip", "fit", *args, _callbacks(KillAtStep, step=5)]
    done = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    _assert_step_checkpoint(tmp_path / "runs" / "killed" / "version_0")
    resumed = main(["fit", *args, "--ckpt_path=last"])
    _assert_continued_like_the_uninterrupted_run(tmp_path, "killed", resumed, reference)


# ----------------------------------------------------------------------------------------------- SLURM preemption
def _slurm_env(tmp_path: Path) -> dict[str, str]:
    """A faked SLURM job: Lightning's SLURMEnvironment.detect() holds, and ``scontrol`` records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    scontrol.chmod(0o755)
    return {
        "SLURM_JOB_ID": JOB,
        "SLURM_JOB_NAME": "usclip-busi",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }


def _in_slurm_job(monkeypatch, tmp_path: Path, restarts: int | None = None) -> None:
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in _slurm_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    if restarts is not None:
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restarts))


def _assert_preempted(tmp_path: Path, name: str) -> None:
    assert (tmp_path / "scontrol.log").read_text() == f"requeue {JOB}\n"
    run = tmp_path / "runs" / name / "version_0"
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert (saved["epoch"], saved["global_step"]) == (1, 5)  # saved at the end of the batch the signal interrupted
    assert json.loads((run / SLURM_MARKER).read_text()) == {"job_id": JOB, "finished": False}
    assert not list(tmp_path.rglob("hpc_ckpt_*.ckpt"))  # Lightning's own handler (cwd, any instruction) did not run


def _requeued_job(tmp_path: Path, name: str, args: list[str], monkeypatch, reference) -> None:
    """The requeued job: the same command in the same job, SLURM_RESTART_COUNT=1, no --ckpt_path."""
    _in_slurm_job(monkeypatch, tmp_path, restarts=1)
    requeued = main(["fit", *args])
    run = tmp_path / "runs" / name / "version_0"
    assert requeued.trainer.ckpt_path == str(run / "checkpoints" / "last.ckpt")
    assert json.loads((run / SLURM_MARKER).read_text()) == {"job_id": JOB, "finished": True}
    _assert_continued_like_the_uninterrupted_run(tmp_path, name, requeued, reference)


def test_slurm_signal_saves_requeues_and_the_requeued_job_continues_bit_for_bit(tmp_path, reference, monkeypatch):
    _in_slurm_job(monkeypatch, tmp_path)
    args = _args(tmp_path, "preempted", *TRAIN)
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(SystemExit) as stopped:  # the signal arrives during step 5 (epoch 1, batch 1)
        main(["fit", *args, _callbacks(SignalAtStep, step=4)])
    assert stopped.value.code == EXIT_REQUEUED
    assert signal.getsignal(signal.SIGUSR1) == before  # the handler is given back
    _assert_preempted(tmp_path, "preempted")
    _requeued_job(tmp_path, "preempted", args, monkeypatch, reference)


@pytest.mark.slow  # fast twin: test_slurm_signal_saves_requeues_and_the_requeued_job_continues_bit_for_bit
def test_slurm_preemption_of_a_real_process_requeues_and_continues_bit_for_bit(tmp_path, reference, monkeypatch):
    env = {k: v for k, v in _env().items() if not k.startswith("SLURM_")} | _slurm_env(tmp_path)
    args = _args(tmp_path, "preempted", *TRAIN)
    marker = tmp_path / "waiting"
    cmd = [sys.executable, "-m", "usclip", "fit", *args, _callbacks(SignalAtStep, step=4, marker=str(marker))]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "the run never reached step 4"
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)  # SLURM's warning before the time limit (#SBATCH --signal=SIGUSR1@120)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_REQUEUED, stderr[-3000:]
    assert marker.read_text() == "1 1"  # the signal came in the middle of epoch 1
    _assert_preempted(tmp_path, "preempted")
    _requeued_job(tmp_path, "preempted", args, monkeypatch, reference)


# ----------------------------------------------------------------------------------------------- sampler skip
@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_resumed_sampler_yields_the_tail_of_the_uninterrupted_epoch(replicas):
    data = list(range(11))
    for rank in range(replicas):
        straight = EpochSampler(data, seed=3, num_replicas=replicas, rank=rank)
        orders = {}
        for epoch in (1, 2, 3):
            straight.set_epoch(epoch)
            orders[epoch] = list(straight)
        resumed = EpochSampler(data, seed=3, num_replicas=replicas, rank=rank)  # a fresh process
        resumed.resume_at(2, 2)
        resumed.set_epoch(1)
        assert list(resumed) == orders[1]  # an earlier epoch is whole and leaves the request pending
        resumed.set_epoch(2)
        assert list(resumed) == orders[2][2:]  # exactly the keys the interrupted run had not consumed
        assert list(resumed) == orders[2]  # used once
        resumed.set_epoch(3)
        assert list(resumed) == orders[3]
        assert len(resumed) == len(orders[2])  # Lightning counts batches of the whole epoch


def test_resume_request_dropped_by_a_later_epoch_and_checked():
    sampler = EpochSampler(list(range(8)), seed=0)
    sampler.resume_at(1, 3)
    sampler.set_epoch(2)
    whole = list(sampler)
    assert len(whole) == 8 and sampler._resume is None
    with pytest.raises(ValueError, match=r"resume_at\(epoch=0, start=9\).*0 <= start <= 8"):
        sampler.resume_at(0, 9)


def _trainer(sampler, epoch: int, processed: int, batches: int = 4, fn: str = "fit", step: int = 7) -> SimpleNamespace:
    """The few trainer attributes training_position/resume_sampler read."""
    progress = SimpleNamespace(current=SimpleNamespace(processed=processed))
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))
    loop.epoch_progress = SimpleNamespace(current=SimpleNamespace(processed=epoch))
    loader = SimpleNamespace(sampler=sampler, batch_size=2)
    return SimpleNamespace(
        fit_loop=loop,
        train_dataloader=loader,
        num_training_batches=batches,
        state=SimpleNamespace(fn=fn),
        global_step=step,
    )


def test_training_position_is_recorded_in_the_middle_of_an_epoch_only():
    sampler = EpochSampler(list(range(10)), seed=0)
    sampler.set_epoch(1)
    expected = {"epoch": 1, "batches": 3, "batch_size": 2, "global_step": 7}
    assert training_position(_trainer(sampler, 1, 3)) == expected
    assert training_position(_trainer(sampler, 1, 0)) is None  # nothing consumed yet
    assert training_position(_trainer(sampler, 2, 4)) is None  # epoch done: the resume starts the next one
    assert training_position(_trainer(sampler, 1, 3, fn="validate")) is None
    assert training_position(_trainer(object(), 1, 3)) is None  # another sampler: nothing it could skip


def test_resume_sampler_sets_the_epoch_and_skips_the_processed_batches():
    data = list(range(10))
    position = {"epoch": 1, "batches": 3, "batch_size": 2, "global_step": 7}
    straight = EpochSampler(data, seed=0)
    straight.set_epoch(1)
    fresh = EpochSampler(data, seed=0)
    resume_sampler(fresh, _trainer(fresh, 1, 0), 2, position)
    assert fresh.epoch == 1 and list(fresh) == list(straight)[6:]
    for epoch, step in ((2, 7), (1, 0)):  # the next epoch; or a loader built before the counters were restored
        other = EpochSampler(data, seed=0)
        resume_sampler(other, _trainer(other, epoch, 0, step=step), 2, position)
        straight.set_epoch(epoch)
        assert other.epoch == epoch and list(other) == list(straight)  # nothing skipped
    with pytest.raises(ValueError, match=r"data.batch_size=4.*batch_size=2"):
        resume_sampler(EpochSampler(data, seed=0), _trainer(fresh, 1, 0), 4, position)


# ----------------------------------------------------------------------------------------------- requeued run lookup
def _run(runs: Path, name: str, job: str, finished: bool, mtime: float, last: bool = True) -> Path:
    ckpt = runs / name / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    (runs / name / SLURM_MARKER).write_text(json.dumps({"job_id": job, "finished": finished}))
    if last:
        torch.save({"state_dict": {}}, ckpt)
        os.utime(ckpt, (mtime, mtime))
    return ckpt


def test_requeued_job_finds_its_unfinished_run(tmp_path, monkeypatch):
    runs = tmp_path / "runs" / "seg"
    mine = _run(runs, "version_1", JOB, False, 200)
    _run(runs, "version_0", JOB, True, 300)  # a finished fit of the same job (an earlier command of its script)
    _run(runs, "version_2", "999", False, 400)  # another job's run
    _run(runs, "version_3", JOB, False, 500, last=False)  # killed before its first checkpoint
    assert find_requeued_run(runs, JOB) == mine
    assert find_requeued_run(runs, "7") is None

    def config(version=None):
        logger = Namespace(
            class_path="TensorBoardLogger",
            init_args=Namespace(save_dir=str(tmp_path / "runs"), name="seg", version=version),
        )
        return Namespace(ckpt_path=None, trainer=Namespace(logger=logger, default_root_dir=str(tmp_path)))

    _in_slurm_job(monkeypatch, tmp_path)
    first = config()
    prepare_subcommand("fit", first)  # the job's first start: a fresh run, even with a matching run on disk
    assert first.ckpt_path is None and first.trainer.logger.init_args.version is None

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    requeued = config()
    prepare_subcommand("fit", requeued)
    assert requeued.ckpt_path == str(mine) and requeued.trainer.logger.init_args.version == 1
    pinned = config(version=2)  # an explicit version names another run: not resumed from this job's run
    prepare_subcommand("fit", pinned)
    assert pinned.ckpt_path is None
    test = config()
    prepare_subcommand("test", test)
    assert test.ckpt_path is None

    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"")  # Lightning would resume any SLURM fit from it: refused
    with pytest.raises(FileExistsError, match=r"holds \['hpc_ckpt_1.ckpt'\].*--ckpt_path .*hpc_ckpt_1.ckpt"):
        prepare_subcommand("fit", config(version=2))
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # an interactive allocation is not a SLURM cluster job
    interactive = config()
    prepare_subcommand("fit", interactive)
    assert interactive.ckpt_path is None


def test_checkpoint_intervals_are_checked():
    with pytest.raises(ValueError, match="checkpoint_every_n_steps must be a positive integer or null, got 0"):
        MidEpochCheckpoint(every_n_steps=0)
    with pytest.raises(ValueError, match="checkpoint_every_minutes must be a positive number or null, got -1"):
        MidEpochCheckpoint(every_minutes=-1)


class RecordSaves(Callback):
    """Record ``(global step, train_position, validating)`` of every checkpoint written."""

    saves: ClassVar[list] = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        position = checkpoint["SegmentationDataModule"].get("train_position")
        RecordSaves.saves.append((trainer.global_step, position and position["batches"], trainer.validating))


def test_mid_epoch_saves_fall_only_where_resuming_is_exact(tmp_path):
    # 6 batches of 2, gradients accumulated over 2 (steps after batches 1, 3, 5), validation after batch 3, a save
    # wanted at every step: only the one after batch 1 may happen (batch 3 is followed by validation, batch 5 ends
    # the epoch, and batches 0, 2, 4 are in the middle of an accumulation)
    RecordSaves.saves = []
    args = _args(
        tmp_path,
        "placement",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=6",
        "--trainer.accumulate_grad_batches=2",
        "--trainer.val_check_interval=4",
        "--data.init_args.batch_size=2",
        "--model.init_args.checkpoint_every_n_steps=1",
    )
    main(["fit", *args, _callbacks(RecordSaves)])
    ours = [(step, batches) for step, batches, validating in RecordSaves.saves if not validating]
    assert ours == [(1, 2)]
    assert (2, 4, True) in RecordSaves.saves  # the checkpoints written after the mid-epoch validation
