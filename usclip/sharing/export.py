"""The inference network as a ``torch.export`` program (``.pt2``) or an ONNX model (``.onnx``).

What is exported is :class:`InferenceModel`: a preprocessed image batch -> logits. Its input ``images`` is float32
``(batch, 3, S, S)`` with values in ``[0, 1]``, as the dataset gives them: the scan area cropped, resized to the
model's ``image_size`` ``S`` and grey levels repeated over 3 channels, as ``preprocessing.json`` says. The
normalisation with the encoder's mean and std happens inside the exported model. Its output ``logits`` is
``(batch, K, S, S)`` (segmentation; softmax over ``K``, then paste back to the original size) or ``(batch, K)``
(classification). The batch size is dynamic unless ``dynamic_batch=False``. docs/sharing.md shows the whole
pipeline with onnxruntime.

ONNX goes through ``torch.onnx.export``: the default ``dynamo`` exporter (``torch.export`` then onnxscript; the
exporter PyTorch develops) or the older ``torchscript`` exporter (faster to run, deprecated by PyTorch); both
give the same numbers for open_clip's ViT with Mona and the heads (tests/test_export.py); LoRA's block-diagonal
up-projection (``aten::block_diag``) exports only with ``dynamo``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from usclip.tasks import BaseTask

log = logging.getLogger(__name__)

OnnxExporter = Literal["dynamo", "torchscript"]
#: the exported model's input and output names
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
#: ONNX files larger than this keep their weights in an external ``<file>.data`` (protobuf's 2 GB limit)
_ONNX_INLINE_LIMIT = 1_500_000_000


class InferenceModel(nn.Module):
    """``[0, 1]`` image batch ``(B, 3, S, S)`` -> logits: the task's normalisation, encoder and head, nothing else.

    The task's ``forward`` with its modules (no Lightning, no compiled encoder, no loss or metrics), so that
    ``torch.export`` and the ONNX exporters see a plain module. Shares the task's modules and tensors (no copy), so
    ``.eval()`` on it puts the task's encoder and head in eval mode too.
    """

    def __init__(self, task: BaseTask) -> None:
        super().__init__()
        self.encoder = task.encoder
        self.head = task.head if task.net is None else None
        self.net = task.net
        self.normalize_input = task.hparams.get("normalization", "clip") != "none"
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", task.pixel_mean.detach().clone(), persistent=False)
        self.register_buffer("std", task.pixel_std.detach().clone(), persistent=False)
        self.image_size = int(task.hparams["image_size"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of preprocessed ``[0, 1]`` images."""
        x = (images - self.mean) / self.std if self.normalize_input else images
        if self.net is not None:
            return self.net(x)
        assert self.encoder is not None and self.head is not None
        return self.head(self.encoder(x), size=images.shape[-2:])

    def example_input(self, batch_size: int = 2) -> torch.Tensor:
        """A random input of the exported shape (the batch size an export traces with)."""
        generator = torch.Generator().manual_seed(0)
        return torch.rand(batch_size, 3, self.image_size, self.image_size, generator=generator).to(self.mean.device)


def _target(path: str | Path, suffix: str, overwrite: bool) -> Path:
    out = Path(path).expanduser()
    if out.suffix != suffix:
        raise ValueError(f"export path {str(path)!r}: expected a file name ending in {suffix}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists: choose another name or overwrite (usclip export --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _dynamic_shapes(dynamic_batch: bool) -> dict[str, dict[int, torch.export.Dim]] | None:
    return {INPUT_NAME: {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None


def export_program(task: BaseTask, *, dynamic_batch: bool = True, batch_size: int = 2) -> torch.export.ExportedProgram:
    """The task's :class:`InferenceModel` through ``torch.export.export`` (CPU, float32, eval mode).

    The export functions move the task itself to the CPU in float32 and eval mode (its modules are shared).

    Args:
        task: a trained task.
        dynamic_batch: any batch size (the example batch has ``batch_size`` images); ``False``: ``batch_size`` only.
        batch_size: the example batch's size (2: a batch of 1 would let the exporter specialise on it).
    """
    model = InferenceModel(task).cpu().float().eval()
    with torch.no_grad():
        return torch.export.export(
            model, (model.example_input(batch_size),), dynamic_shapes=_dynamic_shapes(dynamic_batch), strict=False
        )


def export_torch(
    task: BaseTask,
    path: str | Path,
    *,
    dynamic_batch: bool = True,
    batch_size: int = 2,
    overwrite: bool = False,
    program: torch.export.ExportedProgram | None = None,
) -> Path:
    """Save the inference network as a ``torch.export`` program (``torch.export.save``; ``.pt2``).

    Load it with ``torch.export.load(path).module()`` (no usclip, no open_clip needed): a module mapping the
    preprocessed batch to logits.

    Args:
        task: a trained task.
        path: the ``.pt2`` file.
        dynamic_batch: any batch size; ``False``: ``batch_size`` only.
        batch_size: the example batch's size.
        overwrite: replace an existing file.
        program: the task's :func:`export_program`, when already made (not exported again).

    Returns:
        ``path``.
    """
    out = _target(path, ".pt2", overwrite)
    if program is None:
        program = export_program(task, dynamic_batch=dynamic_batch, batch_size=batch_size)
    torch.export.save(program, str(out))
    log.info("wrote %s", out)
    return out


def export_onnx(
    task: BaseTask,
    path: str | Path,
    *,
    exporter: OnnxExporter = "dynamo",
    opset: int | None = None,
    dynamic_batch: bool = True,
    batch_size: int = 2,
    overwrite: bool = False,
    program: torch.export.ExportedProgram | None = None,
) -> Path:
    """Save the inference network as ONNX (input ``images``, output ``logits``; see the module docstring).

    Args:
        task: a trained task.
        path: the ``.onnx`` file (models over 1.5 GB keep their weights beside it in ``<path>.data``).
        exporter: ``dynamo`` (``torch.onnx.export(dynamo=True)``) or ``torchscript``.
        opset: the ONNX opset (``None``: the exporter's default).
        dynamic_batch: any batch size; ``False``: ``batch_size`` only.
        batch_size: the example batch's size.
        overwrite: replace an existing file.
        program: with ``dynamo``: the task's :func:`export_program`, when already made (not exported again).

    Returns:
        ``path``.
    """
    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"exporter={exporter!r}: expected 'dynamo' or 'torchscript'")
    out = _target(path, ".onnx", overwrite)
    model = InferenceModel(task).cpu().float().eval()
    example = model.example_input(batch_size)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    common = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset}
    with torch.no_grad():
        if exporter == "dynamo":
            torch.onnx.export(
                model if program is None else program,
                (example,) if program is None else (),
                str(out),
                dynamo=True,
                dynamic_shapes=_dynamic_shapes(dynamic_batch) if program is None else None,
                external_data=size > _ONNX_INLINE_LIMIT,
                verbose=False,
                **common,  # type: ignore[arg-type]
            )
        else:
            axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
            with warnings.catch_warnings():
                # chosen knowingly: its deprecation notice, and the tracer's notes on shape checks that hold for
                # every batch (image size and channels are fixed), are no news to the user
                warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                warnings.filterwarnings("ignore", "Constant folding - Only steps=1", UserWarning)
                warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
                torch.onnx.export(model, (example,), str(out), dynamo=False, dynamic_axes=axes, **common)  # type: ignore[arg-type]
    log.info("wrote %s", out)
    return out


def onnx_max_difference(task: BaseTask, path: str | Path, images: torch.Tensor) -> float:
    """Largest absolute difference between onnxruntime's (CPU) logits for ``images`` and the task's.

    Needs ``onnxruntime`` (``pip install usclip[export]``).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the optimiser's notes on nodes it cannot fold are not problems
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: images.cpu().float().numpy()})[0]
    with torch.no_grad():
        want = InferenceModel(task).cpu().float().eval()(images.cpu().float())
    return float((torch.from_numpy(got) - want).abs().max())
