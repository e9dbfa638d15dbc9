"""The real ``usclip`` CLI on tiny configs and synthetic data (fit -> validate -> test -> predict)."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usclip.cli import main
from usclip.data.crop import find_scan_box
from usclip.data.splits import read_split_file

CONF_DIR = Path(__file__).parent / "conf"
CONFIGS = sorted(CONF_DIR.glob("*.yaml"))


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for sub in ("fit", "validate", "test", "predict"):
        assert sub in out


def test_print_config_resolves_links(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--print_config", "--config", str(Path(__file__).parents[1] / "configs" / "demo.yaml")])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usclip.tasks.SegmentationTask" in out
    assert "usclip.data.SegmentationDataModule" in out
    # image_size is written once, under data; the model receives it through the link (see test_configs.py)
    assert out.count("image_size:") == 1 and "image_size: 128" in out


def test_null_overrides_on_the_command_line(tmp_path):
    demo = Path(__file__).parents[1] / "configs" / "demo.yaml"
    args = ["--config", str(demo), f"--data.init_args.root={tmp_path}", "--model.init_args.layers=[1,2]"]
    args += ["--model.init_args.model_name=usclip-test-vit", "--data.init_args.image_size=64"]
    cli = main([*args, "--model.init_args.adapter=null", "--model.init_args.pretrained=null"], run=False)
    assert cli.model.encoder_args["pretrained"] is None and cli.model.encoder_args["adapter"] is None
    assert not any(p.requires_grad for p in cli.model.encoder.parameters())


def test_console_main_returns_nothing(monkeypatch):
    """Cheap twin of the slow console-script test: console scripts exit with what the entry point returns."""
    import usclip.cli as cli

    monkeypatch.setattr(cli, "main", lambda *a, **k: object())  # a CLI object, as main() returns after a run
    assert cli.console_main() is None


@pytest.mark.slow
def test_console_script_exits_zero_after_a_run(tmp_path):
    # the installed `usclip` script, as a user runs it: success must exit 0 (shell scripts use `set -e`)
    script = Path(sys.executable).parent / "usclip"
    conf = CONF_DIR / "segmentation_none.yaml"
    args = [str(script), "fit", *_args(conf, tmp_path), "--trainer.fast_dev_run=true"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    bad = subprocess.run([str(script), "fit", "--config", str(tmp_path / "nope.yaml")], capture_output=True, text=True)
    assert bad.returncode != 0 and "nope.yaml" in bad.stderr


def _args(conf: Path, tmp_path: Path) -> list[str]:
    return [
        "--config",
        str(conf),
        f"--data.init_args.root={tmp_path / 'data'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        f"--trainer.default_root_dir={tmp_path}",
    ]


# Every tiny config runs fit and test in the default suite. validate and predict go through the same task code for
# every model of a task, so the default suite runs them for one config per task (ALL_SUBCOMMANDS) and the slow
# suite for the others as well.
ALL_SUBCOMMANDS = {"segmentation_lora", "classification_lora"}
# CLIPSeg is a transformers model: installed by the dev extra, left out of the lowest-versions run (.ci/run)
NEEDS = {
    "segmentation_clipseg": [
        pytest.mark.skipif(
            importlib.util.find_spec("transformers") is None, reason="CLIPSeg needs transformers (usclip[clipseg])"
        )
    ]
}
MATRIX = [pytest.param(c, c.stem in ALL_SUBCOMMANDS, id=c.stem, marks=NEEDS.get(c.stem, [])) for c in CONFIGS]
MATRIX += [
    pytest.param(c, True, id=f"{c.stem}-all_subcommands", marks=[pytest.mark.slow, *NEEDS.get(c.stem, [])])
    for c in CONFIGS
    if c.stem not in ALL_SUBCOMMANDS
]


@pytest.mark.parametrize(("conf", "all_subcommands"), MATRIX)
def test_fit_validate_test_predict(conf: Path, all_subcommands: bool, tmp_path: Path):
    segmentation = conf.stem.startswith("segmentation")
    monitor = "val_dice" if segmentation else "val_auc"
    cli = main(["fit", *_args(conf, tmp_path)])
    run = Path(cli.trainer.log_dir)
    assert run == tmp_path / "runs" / conf.stem / "version_0"
    best = run / "checkpoints" / "best.ckpt"
    assert best.is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "config.yaml").is_file()
    splits = {s: read_split_file(run / "splits" / f"{s}.txt") for s in ("train", "val", "test")}
    assert sum(len(v) for v in splits.values()) == 24
    assert not set(splits["train"]) & set(splits["test"]) and not set(splits["val"]) & set(splits["test"])

    if all_subcommands:
        cli = main(["validate", *_args(conf, tmp_path), f"--ckpt_path={best}"])
        assert 0.0 <= float(cli.trainer.callback_metrics[monitor]) <= 1.0

    # A different split seed on the command line must not change the test set: the checkpoint carries the split.
    cli = main(["test", *_args(conf, tmp_path), f"--ckpt_path={best}", "--data.init_args.split_seed=123"])
    test_run = Path(cli.trainer.log_dir)
    assert read_split_file(test_run / "splits" / "test.txt") == splits["test"]
    metrics = json.loads((test_run / "results" / "test_metrics.json").read_text())
    assert metrics["num_images"] == len(splits["test"])
    table = "test_per_image.csv" if segmentation else "test_predictions.csv"
    with (test_run / "results" / table).open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["id"] for r in rows) == splits["test"]
    if segmentation:
        assert 0.0 <= metrics["dice"] <= 1.0
        assert np.mean([float(r["dice"]) for r in rows]) == pytest.approx(metrics["dice"], abs=1e-5)
        assert len(list((test_run / "overlays").glob("*.png"))) == 2
    else:
        probs = np.array([[float(r["prob_benign"]), float(r["prob_malignant"])] for r in rows])
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
        labels = np.array([int(r["label"]) for r in rows])
        assert metrics["acc"] == pytest.approx(np.mean((probs[:, 1] >= 0.5) == labels), abs=1e-6)

    if not all_subcommands:
        return
    images = tmp_path / "data" / "images"
    cli = main(["predict", *_args(conf, tmp_path), f"--ckpt_path={best}", f"--data.init_args.predict_root={images}"])
    pred_dir = Path(cli.trainer.log_dir) / "predictions"
    if segmentation:
        masks = sorted((pred_dir / "masks").glob("*.png"))
        assert len(masks) == 24
        with Image.open(masks[0]) as m, Image.open(images / masks[0].name) as im:
            assert m.size == im.size  # masks come back at the original size
            mask = np.asarray(m).copy()
            assert set(np.unique(mask)) <= {0, 255}
            x0, y0, x1, y1 = find_scan_box(np.asarray(im.convert("L")))
            mask[y0:y1, x0:x1] = 0
            assert not mask.any()  # nothing predicted outside the scan area the model saw
        assert len(list((pred_dir / "overlays").glob("*.png"))) == 24
    else:
        with (pred_dir / "probabilities.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 24 and set(rows[0]) == {"id", "prediction", "prob_benign", "prob_malignant"}


# ------------------------------------------------------------------ a fast, clear command line (issue #16 item 3)
def _run_and_list_heavy_modules(args: list[str]) -> tuple[int, str, set[str]]:
    """Run usclip.cli.main(args) in a fresh interpreter; return exit code, stdout and the heavy modules imported."""
    code = (
        "import sys\nfrom usclip.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
        "    code = e.code\nheavy = sorted(m for m in ('torch', 'lightning', 'cv2', 'open_clip') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy))\nsys.exit(code)"
    )
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    heavy_line = [ln for ln in proc.stdout.splitlines() if ln.startswith("HEAVY=")][-1]
    heavy = set(filter(None, heavy_line.removeprefix("HEAVY=").split(",")))
    return proc.returncode, proc.stdout, heavy


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["data", "--help"],
        ["data", "check", "--help"],
        ["captions", "--help"],
        ["export", "--help"],
    ],
)
def test_help_and_version_import_neither_torch_nor_lightning(args):
    code, out, heavy = _run_and_list_heavy_modules(args)
    assert code == 0, out
    assert heavy == set()
    if args == ["--version"]:
        from usclip import __version__

        assert out.splitlines()[0] == f"usclip {__version__}"


def test_top_level_help_lists_every_subcommand():
    from usclip.cli import COMMANDS, HELP, LIGHTNING_SUBCOMMANDS

    listed = {ln.split()[0] for ln in HELP.split("subcommands:")[1].split("options:")[0].splitlines() if ln.strip()}
    assert listed == set(LIGHTNING_SUBCOMMANDS) | set(COMMANDS)
    assert {"data", "report", "captions", "sweep"} <= set(COMMANDS)
    for name, (module, _) in COMMANDS.items():  # every routed module exists and has main(argv) -> int
        assert callable(__import__(module, fromlist=["main"]).main), name


def test_data_command_choices_match_the_library():
    from usclip.commands import data as data_command
    from usclip.data.crop import CROP_MODES
    from usclip.data.layouts import LAYOUTS

    assert data_command.CROP_MODES == CROP_MODES
    assert data_command.LAYOUTS == LAYOUTS


@pytest.mark.parametrize(
    ("extra", "first_line"),
    [
        (["--model.init_args.adaptr=mona"], "usclip: error: model.init_args.adaptr: no such option of SegmentationTa"),
        (["--trainer.max_epochs=abc"], "usclip: error: trainer.max_epochs: Expected a <class 'int'>"),
    ],
)
def test_configuration_errors_print_one_clear_message_first(tmp_path, capsys, extra, first_line):
    conf = CONF_DIR / "segmentation_none.yaml"
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(conf), f"--data.init_args.root={tmp_path}", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("usclip: error:")]
    assert lines and lines[0].startswith(first_line), err
    assert "Namespace(" not in err


def test_weights_that_cannot_be_fetched_are_one_clear_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to find offline
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    conf = CONF_DIR / "segmentation_none.yaml"
    args = ["fit", "--config", str(conf), f"--data.init_args.root={tmp_path}"]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--model.init_args.model_name=ViT-B-16", "--model.init_args.pretrained=openai"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    first = next(ln for ln in err.splitlines() if ln.startswith("usclip: error:"))
    assert "'ViT-B-16' 'openai'" in first
    assert "Namespace(" not in err and "Does not validate" not in err


# ------------------------------------------------------------------ lists through a pipe the reader closed (#26)
@pytest.mark.parametrize("command", ["configs", "data check", "sweep paper --dry-run"])
def test_list_commands_end_quietly_when_the_reader_leaves(tmp_path, command):
    """`usclip configs | head -1`: the reader exits early; no BrokenPipeError traceback, exit code 0.

    The pipe's reading end is closed before the command starts, so the first write fails every time (a reader
    that stops after one line fails only when the output outgrows the pipe's buffer: a race). Every argparse
    subcommand goes through the same router (``usclip.cli._run_printing``); ``data check`` imports torch (2 s).
    """
    from tests.dicom_files import write_dicom_folder

    args = command.split() + ([str(write_dicom_folder(tmp_path / "export"))] if command == "data check" else [])
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "usclip", *args], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 0, proc.stderr
    assert not any(s in proc.stderr for s in ("Traceback", "BrokenPipeError", "Exception ignored")), proc.stderr


# ------------------------------------------------------------------ DataLoader workers fitted to the machine (#26)
def test_num_workers_fit_the_available_cores(monkeypatch, caplog):
    from usclip.data import datamodules

    monkeypatch.setattr(datamodules, "available_cores", lambda: 2)
    with caplog.at_level(logging.INFO, logger="usclip"):
        assert datamodules.resolve_num_workers("auto") == 2 and datamodules.resolve_num_workers(1) == 1
        assert datamodules.resolve_num_workers(0) == 0 and caplog.text == ""
        assert datamodules.resolve_num_workers(3) == 2  # an explicit value above the cores: capped, with a note
    assert "data.num_workers=3 is more than the 2 CPU cores this process may use: starting 2" in caplog.text
    monkeypatch.setattr(datamodules, "available_cores", lambda: 16)
    assert datamodules.resolve_num_workers("auto") == datamodules.AUTO_MAX_WORKERS == 4
    assert datamodules.resolve_num_workers(8) == 8  # kept: within the cores
    for bad in (-1, "many", True, 2.5):
        with pytest.raises(ValueError, match=rf"data.num_workers must be 'auto' or a number .* got {bad!r}"):
            datamodules.resolve_num_workers(bad)


def test_shipped_config_workers_reach_the_dataloaders(tmp_path, monkeypatch):
    """busi_seg.yaml says `num_workers: auto`: one core gives one worker (not 4) to the train and predict loaders."""
    from usclip.data import datamodules

    monkeypatch.setattr(datamodules, "available_cores", lambda: 1)
    args = ["--config", str(Path(__file__).parents[1] / "configs" / "busi_seg.yaml")]
    args += ["--model.init_args.pretrained=null", "--model.init_args.model_name=usclip-test-vit"]
    args += ["--model.init_args.layers=[1,2,3]", "--data.init_args.image_size=32"]
    args += [f"--data.init_args.root={tmp_path / 'd'}", f"--trainer.default_root_dir={tmp_path}"]
    args += ["--data.init_args.synthetic.num_samples=10", "--data.init_args.synthetic.size=32"]
    args += [f"--data.init_args.predict_root={tmp_path / 'd' / 'images'}"]
    dm = main(args, run=False).datamodule
    assert dm.hparams["num_workers"] == "auto" and dm.num_workers == 1
    dm.prepare_data()
    dm.setup("fit")
    assert dm.train_dataloader().num_workers == 1
    dm.setup("predict")
    assert dm.predict_dataloader().num_workers == 1
