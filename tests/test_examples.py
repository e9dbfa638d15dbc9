"""The scripts in examples/ run on synthetic data with tiny arguments and produce what they promise.

Each script is loaded with ``runpy`` (not as ``__main__``: importing must have no side effects) and its ``main`` is
called with small arguments in this process, so torch and the tiny model are imported once.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from typing import Any

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
