"""``usclip report``: tables over seeds from fabricated run directories, and through the real entry point."""

from __future__ import annotations

import csv
import json
import statistics

import numpy as np
import pytest
import yaml
from PIL import Image

from usclip.cli import main
from usclip.reporting import aggregate, find_run_dirs, format_markdown, load_run, method_name, write_overlay_grids

SEG_COLUMNS = ("dice", "iou", "hd95", "asd")


def make_seg_run(root, name, adapter, seed, dataset="synthetic", rng=None):
    """A tested segmentation run: config.yaml, per-image CSV and the metrics JSON the task derives from it."""
    rng = rng or np.random.default_rng(seed)
    run = root / name / f"version_{seed}"
    (run / "results").mkdir(parents=True)
    config = {
        "seed_everything": seed,
        "trainer": {"logger": {"class_path": "TensorBoardLogger", "init_args": {"name": name}}},
        "model": {
            "class_path": "usclip.tasks.SegmentationTask",
            "init_args": {"model_name": "usclip-test-vit", "adapter": adapter, "head": "paper"},
        },
        "data": {"class_path": "usclip.data.SegmentationDataModule", "init_args": {"root": f"/data/{dataset}"}},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    table = {"dice": rng.uniform(0.5, 0.9, 6), "iou": rng.uniform(0.3, 0.8, 6)}
    table |= {"hd95": rng.uniform(2, 20, 6), "asd": rng.uniform(0.5, 5, 6)}
    with (run / "results" / "test_per_image.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", *SEG_COLUMNS])
        writer.writerows([f"img{i}", *(repr(float(table[c][i])) for c in SEG_COLUMNS)] for i in range(6))
    summary = {c: float(table[c].mean()) for c in SEG_COLUMNS} | {"dice_std": 0.1, "num_images": 6}
    (run / "results" / "test_metrics.json").write_text(json.dumps(summary))
    return run


def per_run_means(run):
    with (run / "results" / "test_per_image.csv").open() as f:
        rows = list(csv.DictReader(f))
    return {c: statistics.fmean(float(r[c]) for r in rows) for c in SEG_COLUMNS}


@pytest.fixture
def runs(tmp_path):
    """Three seeds x two methods on one synthetic dataset."""
    return {
        (adapter, seed): make_seg_run(tmp_path / "runs", f"seg_{adapter}", adapter, seed)
        for adapter in ("lora", "mona")
        for seed in (0, 1, 2)
    }


def test_report_means_and_stds_equal_per_run_csvs(runs, tmp_path, capsys):
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path / "runs"), "--output", str(out)])
    code = exc.value.code
    assert code == 0
    with (out / "segmentation.csv").open() as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["lora", "mona"]
    for adapter in ("lora", "mona"):
        per_seed = [per_run_means(runs[adapter, s]) for s in (0, 1, 2)]
        for metric in SEG_COLUMNS:
            values = [p[metric] for p in per_seed]
            assert float(rows[adapter][f"synthetic_{metric}_mean"]) == pytest.approx(
                statistics.fmean(values), abs=1e-12
            )
            assert float(rows[adapter][f"synthetic_{metric}_std"]) == pytest.approx(statistics.stdev(values), abs=1e-12)
            assert int(rows[adapter][f"synthetic_{metric}_n"]) == 3
    printed = capsys.readouterr().out
    assert "## segmentation (6 runs)" in printed
    assert (out / "segmentation.md").read_text().count("| lora |") == 1


def test_markdown_marks_best_second_and_arrows(tmp_path):
    root = tmp_path / "runs"
    for adapter, dice, hd in (("a", 0.8, 5.0), ("b", 0.7, 3.0), ("c", 0.6, 9.0)):
        run = make_seg_run(root, adapter, adapter, 0)
        metrics = {"dice": dice, "iou": dice - 0.1, "hd95": hd, "asd": 1.0, "num_images": 6}
        (run / "results" / "test_metrics.json").write_text(json.dumps(metrics))
    cells = aggregate([load_run(d) for d in find_run_dirs([root])])["segmentation"]
    text = format_markdown("segmentation", cells)
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "synthetic Dice ↑" in rows["Method"] and "synthetic HD95 ↓" in rows["Method"]
    # dice: a best, b second; hd95 (lower is better): b best, a second
    assert rows["a"].split(" | ")[1] == "**80.00 ± 0.00**"
    assert rows["b"].split(" | ")[1] == "_70.00 ± 0.00_"
    assert rows["c"].split(" | ")[1] == "60.00 ± 0.00"
    assert rows["b"].split(" | ")[3] == "**3.00 ± 0.00**"
    assert rows["a"].split(" | ")[3] == "_5.00 ± 0.00_"


def test_method_name_from_config_and_logger_name():
    config = {"model": {"init_args": {"model_name": "m", "adapter": None, "head": "native"}}}
    assert method_name(config) == "m"
    config["model"]["init_args"]["head"] = "paper"
    assert method_name(config) == "m/paper"
    config["model"]["init_args"]["adapter"] = "lora"
    assert method_name(config) == "lora"
    config["trainer"] = {"logger": {"init_args": {"name": "clip_lora"}}}
    assert method_name(config, "name") == "clip_lora"
    with pytest.raises(ValueError, match=r"logger\.init_args\.name"):
        method_name({}, "name")


def test_report_errors_name_the_run_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path / "empty")])
    assert exc.value.code == 2
    assert f"RUN_DIR {tmp_path / 'empty'} holds no tested run" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match=r"has no config\.yaml"):
        load_run(tmp_path / "empty")


def test_overlay_grid_compares_methods_on_the_same_images(runs, tmp_path):
    colours = {"lora": (255, 0, 0), "mona": (0, 0, 255)}
    for (adapter, _seed), run in runs.items():
        for k, image_id in enumerate(("a", "b", "c")):
            if adapter == "mona" and image_id == "c":
                continue  # only ids every method has make it into the grid
            picture = np.zeros((16, 16, 3), dtype=np.uint8)
            picture[:] = colours[adapter]
            picture[0, 0] = (k, k, k)
            (run / "overlays").mkdir(exist_ok=True)
            Image.fromarray(picture).save(run / "overlays" / f"{image_id}.png")
    (grid_path,) = write_overlay_grids([load_run(d) for d in find_run_dirs([tmp_path / "runs"])], tmp_path / "out")
    assert grid_path.name == "overlays_synthetic.png"
    grid = np.asarray(Image.open(grid_path))
    pad, title = 4, 18
    assert grid.shape == (title + 2 * (16 + title) + 3 * pad, 2 * 16 + 3 * pad, 3)
    for r, k in enumerate((0, 1)):  # rows: images a, b; columns: lora, mona
        top = title + pad + r * (16 + title + pad) + title
        for c, adapter in enumerate(("lora", "mona")):
            left = pad + c * (16 + pad)
            assert tuple(grid[top, left]) == (k, k, k)
            assert tuple(grid[top + 8, left + 8]) == colours[adapter]
