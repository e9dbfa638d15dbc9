"""torch.export and ONNX export of the inference network, run with onnxruntime on CPU against PyTorch.

Tolerance: largest absolute logit difference 1e-4 for onnxruntime (fused kernels; about 1e-6 is seen) and 1e-5 for
the ``torch.export`` program, on a batch of 3 while the exports trace a batch of 2 (the batch is dynamic).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from usclip.cli import main as cli_main
from usclip.data import Preprocessing
from usclip.data.crop import paste_back
from usclip.data.preprocessing import ImageInputs
from usclip.sharing import export_onnx, export_torch
from usclip.tasks import ClassificationTask, SegmentationTask, load_task

from .test_sharing import scan, tiny_task, write_run

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the export extra: pip install 'usclip[export]'")
ONNX_ATOL = 1e-4
TORCH_ATOL = 1e-5


def _onnx_logits(path: Path, images: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    return torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """``usclip export`` of a segmentation run with LoRA (the default dynamo exporter; one torch.export trace for
    both files): the run, the output folder and what the command printed."""
    root = tmp_path_factory.mktemp("export")
    # two blocks: the exporters' time is per operator
    run = write_run(tiny_task(SegmentationTask, "lora", layers=[0, 1]), root / "run")
    out = root / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exit_:
        cli_main(["export", str(run), "--out", str(out), "--format", "onnx", "torch-export", "--check"])
    assert exit_.value.code == 0
    return run, out, printed.getvalue()


def test_cli_writes_onnx_torch_export_and_the_preprocessing(exported):
    _, out, printed = exported
    check = re.search(r"largest logit difference (\S+) \(3 random images\)", printed)
    assert check and float(check.group(1)) < ONNX_ATOL, printed
    assert f"wrote {out / 'model.onnx'}" in printed and f"wrote {out / 'model.pt2'}" in printed
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.pt2", "preprocessing.json"]
    assert Preprocessing.from_dict(json.loads((out / "preprocessing.json").read_text())).crop == "none"


def test_onnx_segmentation_lora_matches_pytorch_on_another_batch_size(exported):
    run, out, _ = exported
    task = load_task(run)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    got = _onnx_logits(out / "model.onnx", images)
    with torch.no_grad():
        want = task(images)
    assert got.shape == want.shape == (3, 2, 64, 64)
    torch.testing.assert_close(got, want, rtol=0, atol=ONNX_ATOL)


def test_torch_export_program_matches_pytorch(exported):
    run, out, _ = exported
    program = torch.export.load(str(out / "model.pt2")).module()
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(program(images), load_task(run)(images), rtol=0, atol=TORCH_ATOL)


def test_onnx_with_the_preprocessing_json_gives_predict_image_s_mask(exported):
    """The recipe of docs/sharing.md: ImageInputs prepares, onnxruntime runs, paste_back maps back."""
    run, out, _ = exported
    preprocessing = Preprocessing.from_dict(json.loads((out / "preprocessing.json").read_text()))
    sample = ImageInputs([scan()], preprocessing)[0]
    logits = _onnx_logits(out / "model.onnx", sample["image"][None])[0]
    box, size = tuple(sample["crop_box"].tolist()), tuple(sample["orig_size"].tolist())
    mask = (paste_back(logits, box, size, mode="bilinear").argmax(0) > 0).numpy()
    want = load_task(run).predict_image(scan()).mask
    assert mask.shape == (48, 80) and want.any()
    np.testing.assert_array_equal(mask, want)


def test_classification_mona_onnx_and_torch_export(tmp_path):
    """Mona through the older TorchScript exporter (LoRA's block_diag needs dynamo)."""
    task = tiny_task(ClassificationTask, "mona", layers=[0, 1])
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = task(images)
    onnx_file = export_onnx(task, tmp_path / "m.onnx", exporter="torchscript")
    got = _onnx_logits(onnx_file, images)
    assert got.shape == (3, 2)
    torch.testing.assert_close(got, want, rtol=0, atol=ONNX_ATOL)
    with pytest.raises(FileExistsError, match="already exists"):
        export_onnx(task, onnx_file)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("cls", "adapter"),
    [
        (SegmentationTask, "mona"),
        (SegmentationTask, "lora"),
        (ClassificationTask, "mona"),
        (ClassificationTask, "lora"),
    ],
)
def test_dynamo_onnx_matches_pytorch(tmp_path, cls, adapter):
    """The default exporter (torch.onnx.export(dynamo=True)) on all four pairs, and a static-batch torch.export."""
    task = tiny_task(cls, adapter)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = task(images)
    got = _onnx_logits(export_onnx(task, tmp_path / "m.onnx"), images)
    assert not (tmp_path / "m.onnx.data").exists()  # a small model keeps its weights inside the file
    torch.testing.assert_close(got, want, rtol=0, atol=ONNX_ATOL)
    module = torch.export.load(str(export_torch(task, tmp_path / "m.pt2", dynamic_batch=False))).module()
    torch.testing.assert_close(module(images[:2]), want[:2], rtol=0, atol=TORCH_ATOL)
    with pytest.raises(Exception, match=r"batch|shape|size|[Gg]uard"):
        module(images)  # a static export takes its batch size only
