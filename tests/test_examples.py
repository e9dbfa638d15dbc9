"""The scripts in examples/ run on synthetic data with tiny arguments and produce what they promise.

Each script is loaded with ``runpy`` (not as ``__main__``: importing must have no side effects) and its ``main`` is
called with small arguments in this process, so torch and the tiny model are imported once.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.conftest import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples"


def load_example(name: str) -> dict[str, Any]:
    """The example's module namespace, loaded without running its ``if __name__ == "__main__"`` block."""
    return runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name=f"examples.{name}")


def test_examples_import_without_side_effects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for path in sorted(EXAMPLES.glob("*.py")):
        namespace = runpy.run_path(str(path), run_name="imported")
        assert callable(namespace["main"]), path.name
        assert namespace["__doc__"] and "python examples/" in namespace["__doc__"], f"{path.name}: how to run it"
    assert not any(tmp_path.iterdir())  # nothing written, nothing trained


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float], str]:
    """examples/plain_lightning.py on 12 synthetic images, 2 steps: (run folder, test metrics, printed output)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("plain")
    main = load_example("plain_lightning")["main"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        metrics = main(["--out", str(out), "--synthetic-samples", "12", "--max-steps", "2", "--name", "ex"])
    return out / "ex" / "version_0", metrics, printed.getvalue()


def test_plain_lightning_fits_tests_and_leaves_a_run_folder(plain_run: tuple[Path, dict[str, float], str]) -> None:
    run, metrics, printed = plain_run
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    saved = json.loads((run / "results" / "test_metrics.json").read_text())
    test_ids = (run / "splits" / "test.txt").read_text().split()
    assert test_ids and saved["num_images"] == len(test_ids)
    assert 0.0 <= metrics["test_dice"] <= 1.0
    assert metrics["test_dice"] == pytest.approx(saved["dice"], abs=1e-6)
    assert f"test_dice = {metrics['test_dice']:.4f}" in printed
    assert f"run folder: {run}" in printed
    # the synthetic data went under --out, not into the working folder
    assert len(list((run.parents[1] / "data" / "synthetic" / "images").glob("*.png"))) == 12
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["model_name"] == "usclip-test-vit"
    assert ckpt["hyper_parameters"]["adapter"] == "mona"


def test_predict_one_image_writes_an_overlay_of_the_image_size(
    plain_run: tuple[Path, dict[str, float], str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    from usclip.data.synthetic import generate_sample

    run = plain_run[0]
    image = tmp_path / "scan_7.png"
    Image.fromarray(generate_sample(7, label=1, size=(90, 130)).image).save(image)  # not square, not 96 or 64
    overlay, mask = tmp_path / "overlay.png", tmp_path / "mask.png"
    main = load_example("predict_one_image")["main"]
    pred = main([str(run), str(image), "--overlay", str(overlay), "--mask", str(mask)])
    printed = capsys.readouterr().out

    assert pred.id == "scan_7" and pred.size == (90, 130)
    assert Image.open(overlay).size == (130, 90) and Image.open(overlay).mode == "RGB"
    saved = np.asarray(Image.open(mask))
    assert saved.shape == (90, 130) and set(np.unique(saved)) <= {0, 255}
    np.testing.assert_array_equal(saved > 0, pred.mask)
    area = int(pred.mask.sum())
    assert f"lesion area: {area} pixels ({100 * area / (90 * 130):.2f} % of the image)" in printed
    assert "scan_7: 130 x 90 pixels" in printed

    # the .ckpt file loads as the run folder does, and gives the same mask
    again = main([str(run / "checkpoints" / "best.ckpt"), str(image), "--overlay", str(tmp_path / "again.png")])
    np.testing.assert_array_equal(again.mask, pred.mask)


def test_encoder_in_your_module_saves_only_adapters_and_reloads_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    namespace = load_example("encoder_in_your_module")
    args = ["--out", str(tmp_path), "--samples", "8", "--batch-size", "4", "--max-steps", "2"]
    result = namespace["main"](args)
    printed = capsys.readouterr().out

    assert result["difference"] == 0.0
    assert "max difference after reload: 0" in printed
    with safe_open(str(result["adapters"]), framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["usclip_adapters"])
    assert meta["adapter"] == "lora" and meta["encoder"]["model_name"] == "usclip-test-vit"
    assert keys and all(".lora_" in k for k in keys)  # adapters only: no frozen backbone weights
    with safe_open(str(result["head"]), framework="pt") as f:
        assert set(f.keys()) == {"weight", "bias"}

    # The reload is not vacuous: the trained LoRA updates changed the output, and without them it differs.
    parsed = namespace["parse_args"](args)
    untrained = namespace["LesionShareRegressor"](namespace["build_encoder"](parsed)).eval()
    untrained.head.load_state_dict(namespace["load_file"](str(result["head"])))
    images = namespace["synthetic_data"](8, parsed.image_size, parsed.seed).tensors[0][:4]
    with torch.inference_mode():
        assert not torch.allclose(untrained(images), result["predictions"])


# The README's "As a library" blocks, with tiny stand-ins for the real model, data and training length. Each
# substitution must apply, so a README edit that moves away from them fails here rather than going untested.
README_SUBSTITUTIONS = [
    ('"ViT-B-16"', '"usclip-test-vit"'),
    ('pretrained="openai"', "pretrained=None"),
    ("layers=(3, 6, 9)", "layers=(1, 2, 3)"),
    ("224", "64"),
    ('"path/to/BUSI"', '"data/synthetic"'),
    ("max_epochs=50", 'max_steps=2, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False'),
]


def readme_library_blocks() -> list[str]:
    """The python blocks of README.md's "As a library" section, tiny substitutions applied."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## As a library", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    source = "\n# --- next block ---\n".join(blocks)
    for old, new in README_SUBSTITUTIONS:
        assert old in source, f"README's library blocks no longer contain {old!r}: update README_SUBSTITUTIONS"
        source = source.replace(old, new)
    return source.split("\n# --- next block ---\n")


def test_readme_library_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from usclip.data.synthetic import generate_sample, write_synthetic_dataset

    monkeypatch.chdir(tmp_path)
    write_synthetic_dataset("data/synthetic", num_samples=12, size=96)
    scan = generate_sample(7, label=1, size=(90, 130)).image  # not square, not the training size
    Image.fromarray(scan).save("scan.png")
    fit, predict, encoder = readme_library_blocks()
    namespace: dict[str, Any] = {}

    exec(compile(fit, "README.md:fit", "exec"), namespace)
    assert Path("runs/busi_seg/version_0/checkpoints/best.ckpt").is_file()  # the run folder the comment names

    exec(compile(predict, "README.md:predict", "exec"), namespace)
    pred = namespace["pred"]
    assert pred.mask.shape == (90, 130) and pred.mask.dtype == bool
    assert pred.probabilities.shape == (2, 90, 130)
    assert Image.open("scan_overlay.png").size == (130, 90)

    exec(compile(encoder, "README.md:encoder", "exec"), namespace)
    features = namespace["features"]
    assert [tuple(f.shape) for f in features] == [(2, 64, 4, 4)] * 3
    reloaded = namespace["encoder"]
    assert reloaded.adapter_config is not None and reloaded.adapter_config.name == "lora"
