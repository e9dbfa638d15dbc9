"""Reliability: kill and resume, determinism, safe checkpoint loading, NaN/OOM guards, streaming predict, atomic files.

The end-to-end tests run the real ``usclip`` CLI on the tiny segmentation config (random-weight ``usclip-test-vit``,
24 synthetic images at 64 px); the kill test runs it as a subprocess and SIGKILLs it in the middle of an epoch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import Callback

from usclip._io import atomic_path, write_text_atomic
from usclip._resume import UnsafeCheckpointError, find_last_checkpoint, prepare_subcommand
from usclip.callbacks import AtomicCheckpointIO, NonFiniteLossError, is_out_of_memory
from usclip.cli import console_main, main
from usclip.data.samplers import EpochSampler, EpochSeededDataset, EvalDistributedSampler, build_sampler
from usclip.data.transforms import DEFAULT_AUGMENTATIONS, build_transform
from usclip.metrics import SegmentationMetrics
from usclip.tasks import SegmentationTask
from usclip.visualize import save_png

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "tests" / "conf" / "segmentation_lora.yaml"


@pytest.fixture(autouse=True)
def _restore_determinism():
    """``--trainer.deterministic=true`` switches on deterministic algorithms process-wide: switch them off after."""
    yield
    torch.use_deterministic_algorithms(False)


def _args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [
        "--config",
        str(CONF),
        f"--data.init_args.root={tmp_path / 'data'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        f"--trainer.logger.init_args.name={name}",
        f"--trainer.default_root_dir={tmp_path}",
        *extra,
    ]


RESUME = ("--trainer.max_epochs=3", "--trainer.limit_train_batches=3", "--trainer.deterministic=true")


def _test_metrics(tmp_path: Path, name: str, ckpt: Path) -> dict[str, float]:
    cli = main(["test", *_args(tmp_path, name), f"--ckpt_path={ckpt}"])
    return json.loads((Path(cli.trainer.log_dir) / "results" / "test_metrics.json").read_text())


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


# ----------------------------------------------------------------------------------------------------- kill + resume
class StopAtStep(Callback):
    """In-process stand-in for the kill: at global step ``step`` touch ``marker`` and raise (nothing is saved)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(f"{trainer.current_epoch} {batch_idx}")
            self.halt()

    def halt(self) -> None:
        raise _Stopped(f"stopped at global step {self.step}")


class PauseAtStep(StopAtStep):
    """For the SIGKILL case: touch ``marker`` at global step ``step``, then sleep until the test kills the process."""

    def halt(self) -> None:
        time.sleep(600)


class _Stopped(Exception):
    pass


def _interrupt_at_step_5(tmp_path: Path, how: str) -> None:
    """Run the ``killed`` fit and interrupt it at global step 5: SIGKILL of a subprocess, or an in-process raise."""
    marker = tmp_path / "paused"
    helper = "PauseAtStep" if how == "sigkill" else "StopAtStep"
    pause = json.dumps(
        [{"class_path": f"tests.test_reliability.{helper}", "init_args": {"step": 5, "marker": str(marker)}}]
    )
    args = ["fit", *_args(tmp_path, "killed", *RESUME), f"--trainer.callbacks={pause}"]
    if how == "stopped":
        with pytest.raises(_Stopped):
            main(args)
    else:
        cmd = [sys.executable, "-m", "usclip", *args]
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 240
            while not marker.exists():
                assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
                assert time.monotonic() < deadline, "the run never reached step 5"
                time.sleep(0.2)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == -signal.SIGKILL
    assert marker.read_text() == "1 2"  # interrupted in the middle of epoch 1


# The subprocess SIGKILL is the real thing (~1 min: a fresh interpreter imports torch and Lightning); the default
# twin stops the same run in-process with an exception at the same step, so that last.ckpt holds the end of epoch 0
# and nothing else is saved either. Both catch a resume that writes a new run directory, loses the step or epoch
# counters, takes --seed_everything over the checkpoint's seed, or replays epoch 1's batches in another order.
# Only the SIGKILL one would catch a resume that depends on state left in the interrupted process.
@pytest.mark.parametrize("how", ["stopped", pytest.param("sigkill", marks=pytest.mark.slow)])
def test_killed_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path, how):
    # the uninterrupted reference: 3 epochs of 3 steps
    straight = main(["fit", *_args(tmp_path, "straight", *RESUME)])
    assert straight.trainer.global_step == 9
    straight_last = Path(straight.trainer.log_dir) / "checkpoints" / "last.ckpt"

    # the same run, interrupted at global step 5 = epoch 1, batch 2 (last.ckpt holds the end of epoch 0)
    _interrupt_at_step_5(tmp_path, how)
    run = tmp_path / "runs" / "killed" / "version_0"
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert saved["epoch"] == 0 and saved["global_step"] == 3

    # resume: --ckpt_path last finds the killed run and keeps writing into its directory; the seed stored in the
    # checkpoint wins over a different one on the command line
    resumed = main(["fit", *_args(tmp_path, "killed", *RESUME), "--ckpt_path=last", "--seed_everything=5"])
    assert isinstance(resumed.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert Path(resumed.trainer.log_dir) == run
    assert resumed.trainer.global_step == 9 and resumed.trainer.current_epoch == 3

    # same weights, bit for bit, and the same test metrics
    a = torch.load(straight_last, weights_only=True, map_location="cpu")["state_dict"]
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _test_metrics(tmp_path, "straight", straight_last) == _test_metrics(
        tmp_path, "killed", run / "checkpoints" / "last.ckpt"
    )


def test_ckpt_path_last_without_a_run_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # one `usclip: error:` line, before anything is built
        main(["fit", *_args(tmp_path, "nothing_yet"), "--ckpt_path=last"])
    assert isinstance(exc.value.__cause__.__cause__, FileNotFoundError)
    assert re.search(r"usclip: error: --ckpt_path last: no run under .*nothing_yet", capsys.readouterr().err)


def test_find_last_checkpoint_picks_the_newest_run(tmp_path):
    for version, mtime in (("version_0", 100), ("version_1", 300), ("version_2", 200)):
        path = tmp_path / version / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
        os.utime(path, (mtime, mtime))
    (tmp_path / "version_3").mkdir()  # a test run: no checkpoints
    assert find_last_checkpoint(tmp_path) == tmp_path / "version_1" / "checkpoints" / "last.ckpt"


# ----------------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_weights_on_cpu(tmp_path):
    # (equal test metrics across processes and an interruption: test_killed_mid_epoch_then_resume...)
    args = ("--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.deterministic=true")

    def weights(name: str, *extra: str) -> dict[str, torch.Tensor]:
        cli = main(["fit", *_args(tmp_path, name, *args, *extra)])
        path = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
        return torch.load(path, weights_only=True, map_location="cpu")["state_dict"]

    first, second, other = weights("first"), weights("second"), weights("other", "--seed_everything=1")
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_epoch_sampler_depends_on_seed_and_epoch_only():
    data = list(range(10))
    a, b = EpochSampler(data, seed=3), EpochSampler(data, seed=3)
    a.set_epoch(0)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    b.set_epoch(1)  # a fresh sampler (a resumed process) jumping straight to epoch 1
    assert list(b) == second != first
    assert [e for e, _ in second] == [1] * 10 and sorted(i for _, i in second) == data
    assert list(EpochSampler(data, seed=4)) != first


class _Images(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.transform = build_transform(32, DEFAULT_AUGMENTATIONS | {"HorizontalFlip": {"p": 0.5}}, seed=0)
        self.ids = [f"img{i}" for i in range(4)]
        rng = np.random.default_rng(0)
        self.images = [rng.integers(0, 255, (40, 48), dtype=np.uint8) for _ in range(4)]

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> np.ndarray:
        return self.transform(image=self.images[i])["image"]


def test_augmentations_depend_on_seed_epoch_and_index_only():
    data = EpochSeededDataset(_Images(), seed=7)
    reference = [data[(e, i)] for e in range(3) for i in range(4)]
    fresh = EpochSeededDataset(_Images(), seed=7)  # no history: a resumed process or another worker
    assert np.array_equal(fresh[(2, 3)], reference[11]) and np.array_equal(fresh[(0, 0)], reference[0])
    assert not np.array_equal(reference[0], reference[4])  # epoch 1 augments image 0 differently
    assert data.ids == ["img0", "img1", "img2", "img3"]  # attributes of the wrapped dataset


def test_segmentation_metrics_gather_uneven_shards():
    # two processes holding 3 and 2 images: torchmetrics would stack the gathered columns and fail
    metric = SegmentationMetrics(include=("dice",))
    pred = torch.zeros(3, 8, 8, dtype=torch.bool)
    pred[:, 2:6, 2:6] = True
    metric.update(pred, pred, index=torch.tensor([0, 2, 4]))
    other = {"index": torch.tensor([1, 3])}

    def gather(tensor, group=None):  # rank 1's column: index 1, 3 and perfect scores
        return [tensor, other.get("index") if tensor.dtype == torch.long else tensor[:2]]

    metric._sync_dist(gather)
    table = metric.per_image()
    assert table["index"].tolist() == [0, 1, 2, 3, 4]
    assert metric.compute()["dice"] == 1.0


@pytest.mark.parametrize("n", [1, 7, 8])
def test_eval_sampler_shards_every_image_exactly_once(n):
    data = list(range(n))
    shards = [list(EvalDistributedSampler(data, num_replicas=2, rank=r)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == data
    wrapped, sampler = build_sampler(data, train=False, seed=0, num_replicas=2, rank=1)
    assert wrapped is data and list(sampler or []) == shards[1]
    assert build_sampler(data, train=False, seed=0) == (data, None)


# ----------------------------------------------------------------------------------------------------- safe loading
class _RunsCode:
    """Unpickling this creates the file ``marker`` (any code could run here)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_checkpoint_carrying_code_is_refused_before_anything_runs(tmp_path):
    """Cheap twin of the slow real-CLI test: the check that `usclip test --ckpt_path` runs first."""
    from usclip._resume import check_checkpoint

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode(marker)}, evil)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt.*refused to load.*it calls or builds exec"):
        check_checkpoint(evil)
    assert not marker.exists()


@pytest.mark.slow  # cheap twin: test_checkpoint_carrying_code_is_refused_before_anything_runs
def test_checkpoint_carrying_code_is_refused_by_the_cli(tmp_path):
    probe = tmp_path / "probe"
    torch.save({"payload": _RunsCode(probe)}, tmp_path / "probe.ckpt")
    torch.load(tmp_path / "probe.ckpt", weights_only=False)  # the payload really runs code when unpickled freely
    assert probe.read_text() == "pwned"

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1.0}, "payload": _RunsCode(marker)}, evil)
    cmd = [sys.executable, "-m", "usclip", "test", *_args(tmp_path, "evil"), f"--ckpt_path={evil}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode != 0
    assert "refused to load" in done.stderr and str(evil) in done.stderr and "it calls or builds exec" in done.stderr
    assert not marker.exists()


def test_unreadable_checkpoint_and_weights_only_false_are_clear_errors(tmp_path, capsys):
    truncated = tmp_path / "half.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    with pytest.raises(SystemExit) as exc:  # one `usclip: error:` line (tests/test_cli_errors.py), no traceback
        main(["test", *_args(tmp_path, "t"), f"--ckpt_path={truncated}"])
    assert isinstance(exc.value.__cause__.__cause__, UnsafeCheckpointError)
    assert re.search(r"usclip: error: ckpt_path=.*half\.ckpt.*not a readable torch checkpoint", capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main(["test", *_args(tmp_path, "t"), "--weights_only=false"])
    assert "usclip: error: weights_only=false" in capsys.readouterr().err
    config = Namespace(weights_only=None, ckpt_path=None, return_predictions=None)
    prepare_subcommand("predict", config)
    assert config.weights_only is True and config.return_predictions is False


# ----------------------------------------------------------------------------------------------------- NaN / OOM
def test_nan_loss_stops_training_naming_the_step(tmp_path, monkeypatch):
    original = SegmentationTask._loss
    seen: dict[str, L.LightningModule] = {}

    def nan_at_step_2(self, logits, mask):
        seen["task"] = self
        loss = original(self, logits, mask)
        return loss * float("nan") if self.training and self.trainer.global_step == 2 else loss

    monkeypatch.setattr(SegmentationTask, "_loss", nan_at_step_2)
    with pytest.raises(NonFiniteLossError) as err:
        main(["fit", *_args(tmp_path, "nan", "--trainer.max_epochs=2", "--trainer.limit_train_batches=3")])
    message = str(err.value)
    assert "NaN at global step 2 (epoch 0, batch 2)" in message
    for advice in ("--model.init_args.lr", "bf16-mixed", "--trainer.gradient_clip_val", "usclip data check"):
        assert advice in message
    # stopped before the optimiser step: the weights are finite
    assert all(torch.isfinite(p).all() for p in seen["task"].parameters())
    assert seen["task"].trainer.global_step == 2


def test_out_of_memory_gives_advice_once_and_fails(tmp_path, monkeypatch, caplog):
    def oom(self, batch, batch_idx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(SegmentationTask, "training_step", oom)
    monkeypatch.setattr(sys, "argv", ["usclip", "fit", *_args(tmp_path, "oom")])
    with caplog.at_level(logging.ERROR, logger="usclip.callbacks"), pytest.raises(torch.OutOfMemoryError):
        console_main()
    advice = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(advice) == 1
    for hint in ("--data.init_args.batch_size", "--model.init_args.grad_checkpointing true", "bf16-mixed"):
        assert hint in advice[0]
    assert "batch size 4" in advice[0]
    assert is_out_of_memory(
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    )
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


# ----------------------------------------------------------------------------------------------------- predict
def test_predict_streams_one_file_per_image_and_keeps_nothing(tmp_path):
    cli = main(["fit", *_args(tmp_path, "p", "--trainer.limit_train_batches=1")])
    best = Path(cli.trainer.log_dir) / "checkpoints" / "best.ckpt"
    images = tmp_path / "data" / "images"
    cli = main(["predict", *_args(tmp_path, "p"), f"--ckpt_path={best}", f"--data.init_args.predict_root={images}"])
    assert cli.config["predict"]["return_predictions"] is False
    assert cli.trainer.predict_loop.predictions == []  # nothing accumulated in memory
    loader = cli.trainer.predict_dataloaders
    assert loader.dataset.cache is None  # each image is read once: no cache growing with the number of images
    out = Path(cli.trainer.log_dir) / "predictions"
    names = sorted(p.name for p in images.glob("*.png"))
    assert sorted(p.name for p in (out / "masks").iterdir()) == names  # one mask per image, no temporary files
    assert sorted(p.name for p in (out / "overlays").iterdir()) == names


# ----------------------------------------------------------------------------------------------------- atomic files
def test_interrupted_writes_leave_the_previous_file(tmp_path):
    path = tmp_path / "results" / "test_metrics.json"
    write_text_atomic(path, '{"dice": 0.5}\n')

    class Interrupted(Exception):
        pass

    with pytest.raises(Interrupted), atomic_path(path) as tmp:
        tmp.write_text('{"di')  # half written, then the process is interrupted
        raise Interrupted
    assert path.read_text() == '{"dice": 0.5}\n'
    assert [p.name for p in path.parent.iterdir()] == ["test_metrics.json"]  # no temporary file left behind

    png = tmp_path / "masks" / "a.png"
    with pytest.raises(TypeError):
        save_png(np.zeros((4, 4), dtype=object), png)  # PIL fails half way
    assert not png.parent.exists() or not any(png.parent.iterdir())


def test_checkpoint_writer_keeps_the_previous_file_when_a_save_fails(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 0, "w": torch.ones(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError, match="killed while writing"):
        io.save_checkpoint({"epoch": 1, "w": torch.zeros(3), "x": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 0
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
