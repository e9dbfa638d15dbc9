"""Inputs that used to end in a traceback: each is one ``usclip: error:`` line naming the input and the fix (#23).

Each error has a test running the real CLI (``usclip.cli.main``); none trains. Where the error must come before the
model is built, the task's ``configure_models`` is replaced by one that fails the test. Variants of one error are
checked on the function that raises it, or marked slow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from jsonargparse import Namespace
from PIL import Image

from usclip._resume import UnsafeCheckpointError, check_checkpoint, prepare_subcommand
from usclip.cli import main
from usclip.data import SegmentationDataModule
from usclip.data.synthetic import write_synthetic_dataset
from usclip.tasks import SegmentationTask

CONF = Path(__file__).parent / "conf" / "segmentation_none.yaml"


@pytest.fixture
def never_build(monkeypatch):
    """Building the task fails the test: the error must come first (the weights may take minutes to load)."""

    def fail(self) -> None:
        raise AssertionError("the model was built before the error")

    monkeypatch.setattr(SegmentationTask, "configure_models", fail)


def _error_line(capsys, argv: list[str]) -> str:
    """Run ``usclip ARGV``; it must exit with 2 after exactly one ``usclip: error:`` line and no traceback."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("usclip: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------ data folders, checked before the model is built
def test_a_missing_data_root_is_named_before_the_model_is_built(tmp_path, capsys, never_build):
    missing = tmp_path / "nonexistent"
    line = _error_line(capsys, ["fit", "--config", str(CONF), f"--data.root={missing}", "--data.synthetic=null"])
    assert f"data.root='{missing}' does not exist" in line
    assert "give the dataset folder" in line and "data.synthetic" in line
    assert not missing.exists()


def test_a_missing_test_root_is_named_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"data.test_root='{tmp_path / 'ext'}' does not exist"):
        SegmentationDataModule(str(tmp_path), test_root=str(tmp_path / "ext"))


def test_a_synthetic_root_made_with_other_settings_names_the_config_option(tmp_path, capsys, monkeypatch, never_build):
    write_synthetic_dataset(tmp_path / "syn", num_samples=3, size=40)
    line = _error_line(capsys, ["fit", "--config", str(CONF), f"--data.root={tmp_path / 'syn'}"])
    assert "made with other settings (num_samples=3, now 24, size=40, now 96)" in line
    assert "data.synthetic.overwrite: true" in line and "--data.synthetic.overwrite true" in line
    assert "overwrite=True" not in line
    monkeypatch.undo()  # the option named exists, and replaces the dataset
    argv = ["--config", str(CONF), f"--data.root={tmp_path / 'syn'}", "--data.synthetic.overwrite", "true"]
    main(argv, run=False).datamodule.prepare_data()
    assert len(list((tmp_path / "syn" / "images").iterdir())) == 24


# ------------------------------------------------------------------ --config that is no YAML
def test_an_image_passed_as_config(tmp_path, capsys):
    png = tmp_path / "scan.png"
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(png)
    line = _error_line(capsys, ["fit", "--config", str(png)])
    assert f"--config {png} is a binary file, not a YAML config" in line and "usclip configs" in line


def test_broken_yaml_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epochs: [1,\n")
    line = _error_line(capsys, ["fit", f"--config={bad}"])
    assert f"--config {bad} is not valid YAML" in line and "line 3" in line


# ------------------------------------------------------------------ --ckpt_path that is no checkpoint
def test_a_text_file_as_checkpoint_is_named_before_the_model_is_built(tmp_path, capsys, never_build):
    notes = tmp_path / "notes.txt"
    notes.write_text("epochs: 10\nnotes on the run\n")
    argv = ["test", "--config", str(CONF), f"--data.root={tmp_path}", f"--ckpt_path={notes}"]
    line = _error_line(capsys, argv)
    assert f"ckpt_path='{notes}' is not a readable torch checkpoint (a text file)" in line
    assert "checkpoints/best.ckpt" in line and "KeyError" not in line


def test_an_image_a_folder_or_a_missing_file_as_checkpoint(tmp_path):
    png = tmp_path / "scan.png"
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(png)
    with pytest.raises(UnsafeCheckpointError, match=r"scan.png' is not a readable torch checkpoint \(an image\)"):
        check_checkpoint(png)  # not "holds Python objects ... could run code"
    best = tmp_path / "run" / "checkpoints" / "best.ckpt"
    best.parent.mkdir(parents=True)
    best.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=rf"is a folder; give a checkpoint file \(e.g. --ckpt_path {best}\)"):
        prepare_subcommand("test", Namespace(ckpt_path=str(tmp_path / "run")))
    with pytest.raises(FileNotFoundError, match=r"gone.ckpt' does not exist; give a .ckpt file written by usclip fit"):
        prepare_subcommand("test", Namespace(ckpt_path=str(tmp_path / "gone.ckpt")))


# ------------------------------------------------------------------ misspelt keys and values
MISSPELT = [
    (
        ["--model.adapter=mone"],
        "model.init_args.adapter: 'mone' is not one of 'mona', 'lora', null (did you mean 'mona'?)",
    ),
    (["--model.adaptr=mona"], "model.init_args.adaptr: no such option of SegmentationTask (did you mean 'adapter'?)"),
]
MISSPELT_MORE = [
    (["--data.rot=x"], "data.init_args.rot: no such option of SegmentationDataModule (did you mean 'root'?)"),
    (
        ["--data.synthetic.num_sample=3"],
        "data.init_args.synthetic.num_sample: no such option of SyntheticSpec (did you mean 'num_samples'?)",
    ),
    (["--trainer.max_epocs=3"], "unrecognized argument --trainer.max_epocs (did you mean --trainer.max_epochs?)"),
    (
        ["--model.class_path=usclip.tasks.SegmentationTsk"],
        "model.class_path: usclip.tasks.SegmentationTsk does not exist (did you mean usclip.tasks.SegmentationTask?)",
    ),
    (
        ["--data.synthetic.zzz=1"],
        "data.init_args.synthetic.zzz: no such option of SyntheticSpec; its options: num_samples, size, seed, "
        "malignant_fraction, overwrite",
    ),
]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [*MISSPELT, *(pytest.param(*case, marks=pytest.mark.slow) for case in MISSPELT_MORE)],
)
def test_misspelt_keys_and_values_name_the_key_and_the_closest_valid_one(tmp_path, capsys, extra, expected):
    line = _error_line(capsys, ["fit", "--config", str(CONF), f"--data.root={tmp_path}", *extra])
    assert line == f"usclip: error: {expected}"


def test_a_misspelt_key_in_a_config_file(tmp_path, capsys):
    extra = tmp_path / "extra.yaml"
    extra.write_text("trainer:\n  max_epocs: 3\n")
    line = _error_line(capsys, ["fit", "--config", str(CONF), "--config", str(extra)])
    assert "trainer.max_epocs: no such option of `usclip fit`" in line and "did you mean trainer.max_epochs?" in line
