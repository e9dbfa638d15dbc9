"""The weight files the authors' ``ckpt/`` folder names load as ``pretrained:`` paths (ckpt/README.md of both codes).

Each test writes a file in that file's format under that file's name, from the tiny config with random weights, and
loads it through the CLI as a config names it; the loaded tensors must equal the written ones.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from torch import nn

from usclip.cli import main
from usclip.models import CLIPEncoder, register_model_configs

TINY = "usclip-test-vit"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRUNED = {"ln_post.weight", "ln_post.bias", "proj"}  # the pooling head after the deepest block, not built


def _tiny_clip(seed: int) -> torch.nn.Module:
    register_model_configs()
    torch.manual_seed(seed)
    return open_clip.create_model(TINY, force_quick_gelu=True).eval()


class _OpenAIArchive(nn.Module):
    """The tensors of an OpenAI CLIP archive: the CLIP's own, and ``input_resolution``, ``context_length``,
    ``vocab_size`` as tensors (the release's ``build_model`` deletes them, release:models/openai/model.py:543-545)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        for name, child in clip.named_children():
            self.add_module(name, child)
        for name, p in clip.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, value in (("input_resolution", 64), ("context_length", 16), ("vocab_size", 49408)):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def _task(args: list[str], tmp_path: Path):
    args = [*args, f"--data.init_args.root={tmp_path}", "--data.init_args.image_size=64", "--trainer.precision=32-true"]
    args += [f"--model.init_args.model_name={TINY}", "--model.init_args.layers=[1,3]"]
    return main([*args, f"--trainer.default_root_dir={tmp_path}"], run=False).model


def _assert_visual_equals(encoder: CLIPEncoder, written: dict[str, torch.Tensor]) -> None:
    """Every tensor of the encoder's tower equals the file's ``visual.*`` tensor of that name (in float32)."""
    loaded = {k.replace("base_layer.", ""): v for k, v in encoder.visual.state_dict().items() if ".mona" not in k}
    expected = {k.removeprefix("visual."): v for k, v in written.items() if k.startswith("visual.")}
    assert set(expected) - set(loaded) == PRUNED and set(loaded) <= set(expected)
    for k, v in loaded.items():
        assert v.dtype == torch.float32 and torch.equal(v, expected[k].float()), k


def test_openai_torchscript_vit_b_16_pt(tmp_path, monkeypatch, capsys):
    """``ckpt/ViT-B-16.pt`` as OpenAI distributes it: a TorchScript archive of the whole CLIP with fp16 weights and
    the int entries ``input_resolution``, ``context_length``, ``vocab_size`` (which the release's ``build_model``
    deletes). Loads with ``allow_unsafe_torchscript``, QuickGELU on; also the whole model for caption tuning."""
    model = _OpenAIArchive(_tiny_clip(seed=4).half())
    (tmp_path / "ckpt").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notice
        torch.jit.save(torch.jit.script(copy.deepcopy(model)), str(tmp_path / "ckpt" / "ViT-B-16.pt"))
    written = model.state_dict()
    assert written["visual.conv1.weight"].dtype == torch.float16
    monkeypatch.chdir(tmp_path)
    base = ["--config", str(CONFIGS / "busi_seg.yaml"), "--model.init_args.pretrained=ckpt/ViT-B-16.pt"]
    with pytest.raises(SystemExit):
        _task(base, tmp_path)
    assert "is a TorchScript archive" in capsys.readouterr().err  # and says to pass allow_unsafe_torchscript
    task = _task([*base, "--model.init_args.allow_unsafe_torchscript=true"], tmp_path)
    assert task.encoder.encoder_config["quick_gelu"] is True
    _assert_visual_equals(task.encoder, written)
    whole = CLIPEncoder(TINY, "ckpt/ViT-B-16.pt", layers=(1, 3), keep_text=True, allow_unsafe_torchscript=True)
    assert whole.text_model is not None
    for k, v in whole.text_model.state_dict().items():
        assert torch.equal(v, written[k].float()), k


def test_unimed_clip_vit_b16_pt(tmp_path, monkeypatch):
    """``ckpt/unimed_clip_vit_b16.pt`` as UniMed-CLIP's open_clip training saves it: ``{"epoch", "name",
    "state_dict", "optimizer"}`` with DataParallel's ``module.`` prefix and a BERT text encoder; the authors read
    ``state_dict``, strip ``module.`` and keep ``visual.*`` (later:src/models/unimedclip/segmentation.py:87-96).
    Loaded by the overlay's own ``pretrained:`` path."""
    written = {k: v for k, v in _tiny_clip(seed=5).state_dict().items() if k.startswith("visual.")}
    written |= {"logit_scale": torch.tensor(4.6), "text_encoder.embeddings.word_embeddings.weight": torch.randn(9, 4)}
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 1e-4}]}
    checkpoint = {"epoch": 10, "name": "unimed", "state_dict": {f"module.{k}": v for k, v in written.items()}}
    (tmp_path / "ckpt").mkdir()
    torch.save({**checkpoint, "optimizer": optimizer}, tmp_path / "ckpt" / "unimed_clip_vit_b16.pt")
    monkeypatch.chdir(tmp_path)
    overlay = CONFIGS / "baselines" / "unimedclip.yaml"
    task = _task(["--config", str(CONFIGS / "busi_seg.yaml"), "--config", str(overlay)], tmp_path)
    assert task.hparams["pretrained"] == "ckpt/unimed_clip_vit_b16.pt"
    assert task.encoder.encoder_config["quick_gelu"] is True
    _assert_visual_equals(task.encoder, written)
