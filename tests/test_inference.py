"""One image in, mask out: `predict_image` equals `usclip predict`, `load_task`, `trainer.predict` returns masks."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from usclip.cli import main
from usclip.data import Preprocessing, SegmentationDataModule
from usclip.data.layouts import index_predict_inputs
from usclip.data.preprocessing import ImageInputs, gray_image
from usclip.data.synthetic import generate_sample, write_synthetic_dataset
from usclip.tasks import Prediction, PredictionWriter, SegmentationTask, load_task

CONF = Path(__file__).parent / "conf"
TINY = {"model_name": "usclip-test-vit", "pretrained": None, "layers": [1, 3], "embed_dim": 16, "image_size": 64}


def _scan(seed: int, label: int) -> np.ndarray:
    """A 150 x 230 screen: a 96 x 160 synthetic scan placed off centre, burnt-in text in the top-left corner."""
    canvas = np.zeros((150, 230), np.uint8)
    canvas[40:136, 50:210] = generate_sample(seed, label, size=(96, 160)).image
    cv2.putText(canvas, "DEPTH 5cm", (2, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, 255, 1)
    return canvas


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("scans")
    Image.fromarray(_scan(3, 1)).save(folder / "a.png")
    rgb = np.repeat(_scan(4, 0)[..., None], 3, axis=2)
    rgb[60:64, 100:104] = (255, 0, 0)  # a coloured caliper: luminance, as for any RGB file
    Image.fromarray(rgb).save(folder / "b.png")
    return folder


def _predict_cli(conf: str, scans: Path, tmp_path: Path, *extra: str):
    args = ["predict", "--config", str(CONF / conf), "--data.init_args.root=null", "--data.init_args.synthetic=null"]
    args += [f"--data.init_args.predict_root={scans / '*.png'}", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    return main([*args, f"--trainer.default_root_dir={tmp_path}", *extra])


def test_predict_image_equals_usclip_predict_on_an_off_centre_non_square_scan(scans, tmp_path):
    cli = _predict_cli("segmentation_none.yaml", scans, tmp_path)  # the glob form of data.predict_root
    task, out = cli.model, Path(cli.trainer.log_dir) / "predictions"
    preds = task.predict_image([scans / "a.png", str(scans / "b.png")], batch_size=1)
    assert [p.id for p in preds] == ["a", "b"]
    for p in preds:
        written = np.asarray(Image.open(out / "masks" / f"{p.id}.png")) > 0
        assert p.size == (150, 230) and p.mask.dtype == bool and np.array_equal(p.mask, written)  # bit for bit
        assert np.array_equal(p.overlay(), np.asarray(Image.open(out / "overlays" / f"{p.id}.png")))
        x0, y0, x1, y1 = p.crop_box
        assert (x0, y0) != (230 - x1, 150 - y1)  # the box is not centred: a flipped paste-back would show
        assert p.probabilities.shape == (2, 150, 230) and p.probabilities.dtype == np.float32
        np.testing.assert_allclose(p.probabilities.sum(0), 1.0, atol=1e-6)
        assert np.array_equal(p.probabilities.argmax(0) > 0, p.mask)
        assert (p.probabilities[0, :y0] == 1.0).all() and (p.probabilities[0, :, x1:] == 1.0).all()
        assert p.label is None and p.label_name is None
    assert preds[0].mask.any()  # a non-trivial mask, so equality means something
    # the same pixels given in memory: uint8, float in [0, 1], PIL image (ids image_<k>)
    grey = np.asarray(Image.open(scans / "a.png"))
    same = task.predict_image([grey, grey.astype(np.float32) / 255, Image.open(scans / "a.png")])
    assert [p.id for p in same] == ["image_0", "image_1", "image_2"]
    for p in same:
        assert np.array_equal(p.mask, preds[0].mask)
        np.testing.assert_allclose(p.probabilities, preds[0].probabilities, atol=1e-6)
    # a checkpoint carries the preprocessing: load_task on the run directory predicts the same, in eval mode
    run = tmp_path / "run"
    cli.trainer.save_checkpoint(run / "checkpoints" / "best.ckpt")
    loaded = load_task(run)
    assert isinstance(loaded, SegmentationTask) and not loaded.training
    assert loaded.preprocessing == Preprocessing(image_size=(64, 64)) == cli.datamodule.preprocessing
    again = loaded.predict_image(scans / "a.png")
    assert isinstance(again, Prediction) and np.array_equal(again.mask, preds[0].mask)
    np.testing.assert_allclose(again.probabilities, preds[0].probabilities, atol=1e-6)


def test_classification_predict_image_equals_probabilities_csv(scans, tmp_path):
    cli = _predict_cli("classification_lora.yaml", scans, tmp_path, "--data.init_args.label_names=[benign,malignant]")
    with (Path(cli.trainer.log_dir) / "predictions" / "probabilities.csv").open() as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    preds = cli.model.predict_image([scans / "b.png", scans / "a.png"])
    assert [p.id for p in preds] == ["b", "a"]
    for p in preds:
        row = rows[p.id]
        expected = [float(row["prob_benign"]), float(row["prob_malignant"])]
        assert p.probabilities.shape == (2,) and p.mask is None and p.size == (150, 230)
        np.testing.assert_allclose(p.probabilities, expected, atol=1e-6)
        assert p.label == int(row["prediction"]) and p.label_name == ["benign", "malignant"][p.label]
    assert preds[0].overlay().shape == (150, 230, 3)


def test_trainer_predict_returns_predictions_and_writes_nothing_without_the_writer(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_synthetic_dataset(data, num_samples=10, size=48, seed=1)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    task = SegmentationTask(**TINY)
    assert task.preprocessing == Preprocessing(image_size=(64, 64))  # built in Python: the DataModule defaults
    dm = SegmentationDataModule(str(data), image_size=64, batch_size=4, predict_root=str(data / "images" / "*.png"))
    assert dm.preprocessing == task.preprocessing
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    batches = trainer.predict(task, datamodule=dm)
    preds = [p for batch in batches for p in batch]
    assert len(preds) == 10 and all(isinstance(p, Prediction) for p in preds)
    assert all(p.size == (48, 48) and p.mask.shape == (48, 48) for p in preds)
    assert sorted(work.rglob("*")) == []  # no mask, no overlay, no splits/ in the working folder
    # with the writer, the same masks as files
    writer = PredictionWriter(tmp_path / "out")
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer]).predict(task, dm)
    for p in preds:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "masks" / f"{p.id}.png")) > 0, p.mask)


def test_predict_root_takes_a_folder_a_file_or_a_glob_and_names_a_missing_one(tmp_path):
    for name in ("x.png", "y.png", "z.jpg"):
        Image.fromarray(np.full((20, 30), 90, np.uint8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    assert index_predict_inputs(tmp_path).ids == ["x", "y", "z"]
    assert index_predict_inputs(tmp_path / "y.png").ids == ["y"]
    assert index_predict_inputs(str(tmp_path / "*.png")).ids == ["x", "y"]
    with pytest.raises(FileNotFoundError, match=r"data.predict_root='.*nope\.png' does not exist; expected a folder"):
        index_predict_inputs(tmp_path / "nope.png", "data.predict_root")
    with pytest.raises(FileNotFoundError, match=r"the glob matches no image file"):
        index_predict_inputs(str(tmp_path / "*.dcm"))
    with pytest.raises(ValueError, match=r"notes\.txt' is not an image file"):
        index_predict_inputs(tmp_path / "notes.txt")
    dm = SegmentationDataModule(None, image_size=16, predict_root=str(tmp_path / "y.png"))
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["id"] == ["y"] and batch["orig_size"].tolist() == [[20, 30]]


def test_in_memory_images_are_read_as_files_are_and_bad_inputs_are_named(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    from usclip.data.imageio import read_image

    assert np.array_equal(gray_image(rgb), read_image(tmp_path / "rgb.png"))  # ITU-R 601, as PIL reads the file
    assert np.array_equal(gray_image(rgb, "replace"), read_image(tmp_path / "rgb.png", colour="replace"))
    grey = rgb[..., 0]
    assert np.array_equal(gray_image(grey.astype(np.float64)), grey)  # [0, 255] floats
    assert np.array_equal(gray_image(grey / 255.0), grey)  # [0, 1] floats
    assert np.array_equal(gray_image(grey.astype(np.int64)), grey)
    deep = (grey.astype(np.uint16) << 4) | 3  # 12-bit data: scaled from its bit depth, as a 16-bit PNG
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert np.array_equal(gray_image(deep), read_image(tmp_path / "deep.png"))
    with pytest.raises(ValueError, match=r"expected an image array of shape \(H, W\).*got shape \(2, 12, 20\)"):
        gray_image(np.zeros((2, 12, 20), np.uint8))
    with pytest.raises(ValueError, match=r"float images must hold values in \[0, 1\] or \[0, 255\], got \[-1, 1\]"):
        gray_image(np.linspace(-1, 1, 240).reshape(12, 20))
    with pytest.raises(ValueError, match="dtype bool"):
        gray_image(np.zeros((12, 20), bool))
    p = Preprocessing(image_size=(24, 40), crop="none")
    with pytest.raises(FileNotFoundError, match=r"image '.*missing\.png' is no file"):
        ImageInputs([tmp_path / "missing.png"], p)
    with pytest.raises(ValueError, match=r"input 1: expected a path \(str or Path\), a numpy array or a PIL image"):
        ImageInputs([grey, 3], p)
    with pytest.raises(ValueError, match=r"needs crop_box=\(x0, y0, x1, y1\)"):
        ImageInputs([grey], Preprocessing(crop="boxes"))
    sample = ImageInputs([grey], p, crop_boxes=[(2, 1, 18, 9)])[0]  # a given box wins; non-square input size
    assert sample["image"].shape == (3, 24, 40) and sample["crop_box"].tolist() == [2, 1, 18, 9]


def test_preprocessing_round_trips_and_refuses_unknown_values():
    p = Preprocessing(image_size=(32, 48), crop="none", colour="replace", regions="error")
    assert Preprocessing.from_dict(p.to_dict()) == p and p.to_dict()["image_size"] == [32, 48]
    assert Preprocessing(image_size=40).image_size == (40, 40)
    with pytest.raises(ValueError, match=r"unknown keys \['resize'\]"):
        Preprocessing.from_dict({"resize": 3})
    with pytest.raises(ValueError, match=r"Preprocessing\.crop must be one of"):
        Preprocessing(crop="center")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"regions='all' needs crop='auto'"):
        Preprocessing(crop="none", regions="all")


def test_load_task_names_a_missing_path_and_a_file_that_is_no_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'.*nowhere' does not exist; expected a \.ckpt file or a run"):
        load_task(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"is a folder without checkpoints/best\.ckpt"):
        load_task(tmp_path)
    (tmp_path / "notes.ckpt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.ckpt' is not a readable torch checkpoint"):
        load_task(tmp_path / "notes.ckpt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match=r"bare\.ckpt' is not a Lightning checkpoint of a usclip task"):
        load_task(tmp_path / "bare.ckpt")
