"""A new user's first hour (issue #16 item 7): where test results go, loggers as a YAML choice, read-only data."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from lightning.pytorch.loggers import Logger

from usclip.cli import main
from usclip.commands.report import main as report_main
from usclip.run_dirs import check_logger_installed, checkpoint_run

ROOT = Path(__file__).parents[1]
CONF = ROOT / "tests" / "conf" / "segmentation_none.yaml"
LOGGERS = ROOT / "configs" / "loggers"


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(CONF),
        *extra,
        f"--data.init_args.root={tmp_path / 'data'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        f"--trainer.default_root_dir={tmp_path}",
        "--model.init_args.num_overlays=1",
    ]


def _usclip_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("usclip")]


def test_test_says_where_results_went_and_which_run_trained(tmp_path, caplog):
    fit = main(["fit", *_args(tmp_path)])
    fit_run = tmp_path / "runs" / "segmentation_none" / "version_0"
    assert Path(fit.trainer.log_dir) == fit_run
    best = fit_run / "checkpoints" / "best.ckpt"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="usclip"):
        test = main(["test", *_args(tmp_path), f"--ckpt_path={best}"])
    test_run = tmp_path / "runs" / "segmentation_none" / "version_1"
    assert Path(test.trainer.log_dir) == test_run
    (line,) = [m for m in _usclip_messages(caplog) if m.startswith("usclip test: results in")]
    # one line, naming both folders that were written, the checkpoint and the run it was trained in
    assert f"{test_run / 'results'}, {test_run / 'overlays'}" in line
    assert f"checkpoint {best}" in line and f"trained in the run {fit_run};" in line
    assert (test_run / "results" / "test_metrics.json").is_file()
    assert not (fit_run / "results").exists()  # the fit run is never written over
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="usclip"):
        predict = main(["predict", *_args(tmp_path), f"--ckpt_path={best}"])
    (line,) = [m for m in _usclip_messages(caplog) if m.startswith("usclip predict: results in")]
    assert line.startswith(f"usclip predict: results in {Path(predict.trainer.log_dir) / 'predictions'} (")


def test_checkpoint_run():
    assert checkpoint_run("runs/a/version_3/checkpoints/best.ckpt") == Path("runs/a/version_3")
    assert checkpoint_run("weights/best.ckpt") is None and checkpoint_run(None) is None


def test_csv_logger_overlay_keeps_the_run_directory_and_report_reads_it(tmp_path, capsys):
    csv_conf = str(LOGGERS / "csv.yaml")
    fit = main(["fit", *_args(tmp_path, "--config", csv_conf)])
    assert type(fit.trainer.logger).__name__ == "CSVLogger"
    run = tmp_path / "runs" / "segmentation_none" / "version_0"
    # config.yaml, checkpoints, splits and the logger's own metrics.csv all in one run directory
    for name in ("config.yaml", "checkpoints/best.ckpt", "checkpoints/last.ckpt", "splits/test.txt", "metrics.csv"):
        assert (run / name).is_file(), name
    # --ckpt_path last finds the CSV run; the test writes a new run with results and overlays
    test = main(["test", *_args(tmp_path, "--config", csv_conf), "--ckpt_path=last"])
    assert test.trainer.ckpt_path == str(run / "checkpoints" / "last.ckpt")
    test_run = Path(test.trainer.log_dir)
    assert test_run == run.with_name("version_1")
    assert (test_run / "config.yaml").is_file() and (test_run / "results" / "test_metrics.json").is_file()
    assert len(list((test_run / "overlays").glob("*.png"))) == 1
    capsys.readouterr()
    out_dir = tmp_path / "report"
    assert report_main([str(tmp_path / "runs"), "--output", str(out_dir), "--grid-images", "1"]) == 0
    assert "(1 runs)" in capsys.readouterr().out
    assert list(out_dir.glob("*.md")) and list(out_dir.glob("overlays_*.png"))


class TrackingLogger(Logger):
    """A logger like MLflow's: ``trainer.log_dir`` is its bare ``save_dir``; runs are ``<experiment id>/<run id>``,
    a new random run id each time unless ``run_id`` continues a run."""

    def __init__(self, save_dir: str = "mlruns", experiment_name: str = "usclip", run_id: str | None = None) -> None:
        super().__init__()
        self._save_dir = save_dir
        self._run_id = run_id or f"run{os.urandom(4).hex()}"

    @property
    def name(self) -> str:
        return "0"  # the experiment id

    @property
    def version(self) -> str:
        return self._run_id

    @property
    def save_dir(self) -> str:
        return self._save_dir  # MLflow: the local path of its tracking URI

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")  # the resumed run's own
def test_a_logger_whose_log_dir_is_shared_still_gets_one_directory_per_run(tmp_path, capsys):
    # trainer.log_dir is tmp_path/mlruns for every run: config.yaml, splits, results and overlays would be written
    # over by the next run and sit apart from checkpoints/ (which Lightning puts in <experiment id>/<run id>)
    logger = ["--trainer.logger.class_path=tests.test_first_hour.TrackingLogger"]
    args = [*_args(tmp_path, *logger), f"--trainer.logger.init_args.save_dir={tmp_path / 'mlruns'}"]
    fit = main(["fit", *args])
    assert Path(fit.trainer.log_dir) == tmp_path / "mlruns"
    run = tmp_path / "mlruns" / "0" / fit.trainer.logger.version
    for name in ("config.yaml", "checkpoints/best.ckpt", "checkpoints/last.ckpt", "splits/test.txt"):
        assert (run / name).is_file(), name
    assert not (tmp_path / "mlruns" / "config.yaml").exists() and not (tmp_path / "mlruns" / "splits").exists()
    # --ckpt_path last finds <experiment>/<run>/checkpoints/last.ckpt; the test is a new run of its own
    test = main(["test", *args, "--ckpt_path=last"])
    assert test.trainer.ckpt_path == str(run / "checkpoints" / "last.ckpt")
    test_run = tmp_path / "mlruns" / "0" / test.trainer.logger.version
    assert test_run != run and (test_run / "config.yaml").is_file()
    assert (test_run / "results" / "test_metrics.json").is_file()
    assert len(list((test_run / "overlays").glob("*.png"))) == 1
    capsys.readouterr()
    assert report_main([str(tmp_path / "mlruns"), "--output", str(tmp_path / "report"), "--grid-images", "1"]) == 0
    assert "(1 runs)" in capsys.readouterr().out
    # fit --ckpt_path last continues the run it resumes (MLflow: run_id), not a new one
    resumed = main(["fit", *args, "--ckpt_path=last", "--trainer.max_epochs=2"])
    assert resumed.trainer.logger.version == run.name and resumed.trainer.current_epoch == 2
    assert sorted(p.name for p in (tmp_path / "mlruns" / "0").iterdir()) == sorted([run.name, test_run.name])


@pytest.mark.parametrize("name", ["csv", "tensorboard", "mlflow", "wandb"])
def test_every_logger_overlay_parses(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(CONF), "--config", str(LOGGERS / f"{name}.yaml"), "--print_config"])
    assert exc.value.code == 0
    expected = {"csv": "CSVLogger", "tensorboard": "TensorBoardLogger", "mlflow": "MLFlowLogger"}
    expected["wandb"] = "WandbLogger"
    assert f"class_path: lightning.pytorch.loggers.{expected[name]}" in capsys.readouterr().out


@pytest.mark.parametrize(("name", "package"), [("mlflow", "mlflow"), ("wandb", "wandb")])
def test_a_logger_that_is_not_installed_is_one_clear_error(name, package, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == package else real(n, *a))
    with pytest.raises(SystemExit) as exc:
        main(["fit", *_args(tmp_path, "--config", str(LOGGERS / f"{name}.yaml"))])
    assert exc.value.code == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert f"the {package!r} package is not installed; `pip install 'usclip[{package}]'`" in first
    assert "configs/loggers/csv.yaml" in first
    assert not (tmp_path / "data").exists()  # refused before anything was built or written


def test_check_logger_installed_passes_for_loggers_without_extra_packages():
    check_logger_installed("lightning.pytorch.loggers.CSVLogger")
    check_logger_installed(None)
    with pytest.raises(ModuleNotFoundError, match="'surely_not_a_package_xyz'"):
        from usclip import run_dirs

        run_dirs.LOGGER_PACKAGES["FakeLogger"] = "surely_not_a_package_xyz"
        try:
            check_logger_installed("somewhere.FakeLogger")
        finally:
            del run_dirs.LOGGER_PACKAGES["FakeLogger"]


# ------------------------------------------------------------------ a read-only dataset folder, groups from elsewhere
def _forbid_writes_under(root: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every write below ``root`` fail (as on a read-only mount, even as root) and record the attempts."""
    import builtins
    import io
    import os

    attempts: list[str] = []
    root = root.resolve()

    def under(path: object) -> bool:
        try:
            return Path(os.fsdecode(path)).resolve().is_relative_to(root)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False

    def guard(name: str, fn, writes=lambda *a, **k: True):
        def wrapped(path, *args, **kwargs):
            if under(path) and writes(*args, **kwargs):
                attempts.append(f"{name} {path}")
                raise PermissionError(13, "Read-only file system", str(path))
            return fn(path, *args, **kwargs)

        return wrapped

    def write_mode(mode="r", *args, **kwargs):
        return any(c in str(mode) for c in "wax+")

    def write_flags(flags, *args, **kwargs):
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

    monkeypatch.setattr(builtins, "open", guard("open", builtins.open, write_mode))
    monkeypatch.setattr(io, "open", guard("open", io.open, write_mode))
    monkeypatch.setattr(os, "open", guard("os.open", os.open, write_flags))
    monkeypatch.setattr(os, "mkdir", guard("mkdir", os.mkdir))
    for name in ("replace", "rename"):  # the destination counts
        fn = getattr(os, name)
        monkeypatch.setattr(os, name, lambda src, dst, *a, _fn=fn, _n=name, **k: guard(_n, lambda d: _fn(src, d))(dst))
    return attempts


def test_a_read_only_dataset_folder_with_groups_from_elsewhere(tmp_path, monkeypatch):
    from usclip.data.splits import read_split_file
    from usclip.data.synthetic import write_synthetic_dataset

    root = tmp_path / "data"
    write_synthetic_dataset(root, num_samples=24, size=96, seed=0)
    (root / "groups.csv").unlink()
    ids = sorted(p.stem for p in (root / "images").glob("*.png"))
    groups_file = tmp_path / "elsewhere" / "groups.csv"
    groups_file.parent.mkdir()
    groups_file.write_text("id,group\n" + "".join(f"{i},g{k // 2}\n" for k, i in enumerate(ids)))  # 12 pairs
    attempts = _forbid_writes_under(root, monkeypatch)
    if os.geteuid() != 0:  # a real read-only folder too, where chmod means something
        for p in [root, *root.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
    try:
        extra = [f"--data.init_args.groups_csv={groups_file}", "--data.init_args.synthetic=null"]
        extra.append("--data.init_args.split_fractions=[0.5,0.25,0.25]")
        fit = main(["fit", *_args(tmp_path, *extra)])
        run = Path(fit.trainer.log_dir)
        main(["test", *_args(tmp_path, *extra), f"--ckpt_path={run / 'checkpoints' / 'best.ckpt'}"])
    finally:
        if os.geteuid() != 0:
            for p in [root, *root.rglob("*")]:
                p.chmod(p.stat().st_mode | 0o200)
    assert attempts == []
    split_of = {i: s for s in ("train", "val", "test") for i in read_split_file(run / "splits" / f"{s}.txt")}
    assert sorted(split_of) == ids
    for k in range(12):  # each group of the external file lies in one split
        assert split_of[ids[2 * k]] == split_of[ids[2 * k + 1]]


def test_the_write_guard_catches_writes_under_root(tmp_path, monkeypatch):
    from usclip._io import write_text_atomic

    attempts = _forbid_writes_under(tmp_path / "ro", monkeypatch)
    (tmp_path / "ok.txt").write_text("fine")  # elsewhere: allowed, also beside root with a common prefix
    (tmp_path / "ro.txt").write_text("fine")
    for write in (
        lambda: (tmp_path / "ro" / "splits").mkdir(parents=True),
        lambda: write_text_atomic(tmp_path / "ro" / "a.txt", "x"),
        lambda: open(tmp_path / "ro" / "b.txt", "w"),  # noqa: SIM115
    ):
        with pytest.raises(PermissionError):
            write()
    assert len(attempts) == 3


def test_groups_csv_errors_name_the_argument(tmp_path):
    from usclip.data import SegmentationDataModule
    from usclip.data.synthetic import write_synthetic_dataset

    root = tmp_path / "data"
    write_synthetic_dataset(root, num_samples=12, size=64, seed=0)
    dm = SegmentationDataModule(root=str(root), image_size=32, groups_csv=str(tmp_path / "missing.csv"))
    with pytest.raises(FileNotFoundError, match=r"data.groups_csv=.*missing.csv' does not exist; expected .*id,group"):
        dm.setup("fit")
    other = tmp_path / "other.csv"
    other.write_text("id,group\nbenign_001,a\n")
    dm = SegmentationDataModule(root=str(root), image_size=32, groups_csv=str(other))
    with pytest.raises(ValueError, match=r"none of its 1 ids is an image id of the dataset"):
        dm.setup("fit")


# ------------------------------------------------------------------ BUSI without groups.csv: one warning and the fix
@pytest.mark.parametrize("which", ["release", "generic"])
def test_busi_without_groups_warns_with_the_command_that_fixes_it(which, tmp_path, caplog):
    from tests.test_data import make_busi_pair
    from usclip.data import SegmentationDataModule

    release, generic = make_busi_pair(tmp_path)
    root = release if which == "release" else generic
    dm = SegmentationDataModule(root=str(root), image_size=16, split_fractions=(0.6, 0.2, 0.2))
    with caplog.at_level(logging.WARNING, logger="usclip"):
        dm.setup("fit")
    (message,) = [m for m in _usclip_messages(caplog) if "groups.csv" in m]
    assert "looks like a BUSI release and has no groups.csv" in message
    assert "duplicate scans on both sides of the split" in message
    assert f"`usclip data duplicates {root}`" in message
    # with groups (in root, or from data.groups_csv) there is nothing to warn about
    (root / "groups.csv").write_text("id,group\n" + "".join(f"{i},{i}\n" for i in dm._index.ids))  # type: ignore[union-attr]
    for kwargs in ({}, {"groups_csv": str(root / "groups.csv")}):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="usclip"):
            SegmentationDataModule(root=str(root), image_size=16, split_fractions=(0.6, 0.2, 0.2), **kwargs).setup(
                "fit"
            )
        assert not [m for m in _usclip_messages(caplog) if "BUSI" in m]


def test_no_busi_warning_for_other_datasets(tmp_path, caplog):
    from usclip.data import SegmentationDataModule
    from usclip.data.synthetic import write_synthetic_dataset

    root = tmp_path / "thyroid"
    write_synthetic_dataset(root, num_samples=12, size=64, seed=0)
    (root / "groups.csv").unlink()
    with caplog.at_level(logging.WARNING, logger="usclip"):
        SegmentationDataModule(root=str(root), image_size=32).setup("fit")
    assert not [m for m in _usclip_messages(caplog) if "BUSI" in m]


def test_data_check_warns_about_busi_without_groups(tmp_path, capsys):
    from tests.test_data import make_busi_pair

    release, _ = make_busi_pair(tmp_path)
    with pytest.raises(SystemExit):
        main(["data", "check", str(release)])
    out = capsys.readouterr().out
    assert "looks like a BUSI release and has no groups.csv" in out and f"usclip data duplicates {release}" in out
    groups = tmp_path / "g.csv"
    groups.write_text("id,group\nbenign_001,a\nbenign_002,a\nghost,b\n")
    with pytest.raises(SystemExit):
        main(["data", "check", str(release), "--groups", str(groups)])
    out = capsys.readouterr().out
    assert "no groups.csv" not in out and "1 ids have no image and are ignored: ['ghost']" in out


# ------------------------------------------------------------------ progress bars on data check / duplicates
def test_data_commands_show_a_progress_bar_on_a_terminal_only(tmp_path, monkeypatch, capsys):
    import usclip.data.checks
    import usclip.data.duplicates
    from usclip.data.synthetic import write_synthetic_dataset

    root = tmp_path / "data"
    write_synthetic_dataset(root, num_samples=6, size=64, seed=0)
    bars: list[tuple[str, int, object]] = []

    def fake_tqdm(items, **kwargs):
        items = list(items)
        bars.append((kwargs.get("desc"), len(items), kwargs.get("disable")))
        return iter(items)

    for module in (usclip.data.checks, usclip.data.duplicates):
        monkeypatch.setattr(module, "tqdm", fake_tqdm)
    with pytest.raises(SystemExit):
        main(["data", "check", str(root)])
    with pytest.raises(SystemExit):
        main(["data", "duplicates", str(root), "--output", str(tmp_path / "groups.csv")])
    # one bar over every image each (and one over the comparison's tiles: one tile for 6 images);
    # disable=None: shown on a terminal, hidden in pipes and logs
    assert bars == [("checking images", 6, None), ("reading images", 6, None), ("comparing", 1, None)]
    bars.clear()
    usclip.data.checks.check_dataset(root)  # the library stays quiet unless asked
    assert bars == [("checking images", 6, True)]
