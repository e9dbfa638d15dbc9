"""A new user's first hour (issue #16 item 7): where test results go, loggers as a YAML choice, read-only data."""

from __future__ import annotations

import logging
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
    """A logger like MLflow's: ``trainer.log_dir`` is its bare ``save_dir``, runs are ``<experiment>/<run id>``."""

    def __init__(self, save_dir: str = "mlruns") -> None:
        super().__init__()
        self._save_dir = save_dir

    @property
    def name(self) -> str:
        return "0"

    @property
    def version(self) -> str:
        return "run-a1b2"

    @property
    def save_dir(self) -> str:
        return self._save_dir  # MLflow: the local path of its tracking URI

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_a_logger_whose_log_dir_is_shared_still_gets_one_directory_per_run(tmp_path, capsys):
    # trainer.log_dir would be tmp_path/mlruns for every run: config.yaml, splits, results and overlays would be
    # written over by the next run and sit apart from checkpoints/ (which Lightning puts in <experiment>/<run id>)
    logger = ["--trainer.logger.class_path=tests.test_first_hour.TrackingLogger"]
    args = [*_args(tmp_path, *logger), f"--trainer.logger.init_args.save_dir={tmp_path / 'mlruns'}"]
    fit = main(["fit", *args])
    assert Path(fit.trainer.log_dir) == tmp_path / "mlruns"
    run = tmp_path / "mlruns" / "0" / "run-a1b2"
    for name in ("config.yaml", "checkpoints/best.ckpt", "splits/test.txt"):
        assert (run / name).is_file(), name
    assert not (tmp_path / "mlruns" / "config.yaml").exists() and not (tmp_path / "mlruns" / "splits").exists()
    main(["test", *args, f"--ckpt_path={run / 'checkpoints' / 'best.ckpt'}"])
    assert (run / "results" / "test_metrics.json").is_file() and len(list((run / "overlays").glob("*.png"))) == 1
    capsys.readouterr()
    assert report_main([str(tmp_path / "mlruns"), "--output", str(tmp_path / "report"), "--grid-images", "1"]) == 0
    assert "(1 runs)" in capsys.readouterr().out


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
    assert f"the {package!r} package is not installed; `pip install {package}`" in first
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
