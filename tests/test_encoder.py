"""CLIPEncoder: weights loading, pruning, image-size policy, timm trunks (BiomedCLIP path), adapters on top."""

from __future__ import annotations

import copy
import json
import warnings

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file
from torch import nn

import usclip.models.encoder as encoder_module
from usclip.adapters import (
    LoraQkvLinear,
    Mona,
    MonaTimmBlock,
    adapter_parameter_names,
    load_adapters,
    merge_adapters,
    save_adapters,
)
from usclip.models import CLIPEncoder, PretrainedWeightsError
from usclip.models.encoder import _build_tower, is_torchscript_archive, load_checkpoint_file

TINY = "usclip-test-vit"
TIMM = "usclip-test-timm-vit"
TIMM_BLOCK_ATTRS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def _images(n=2, size=64, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _clip(name, seed=0, **kw):
    torch.manual_seed(seed)
    return open_clip.create_model(name, **kw).eval()


def _reference(model, images, layers):
    with torch.no_grad():
        out = model.visual.forward_intermediates(images, indices=list(layers), stop_early=True, intermediates_only=True)
    return out["image_intermediates"]


def _assert_equal(feats, ref):
    # The encoder's batch-first attention (usclip.attention) sums in another order than PyTorch's fused
    # inference kernel that open_clip's eval-mode nn.MultiheadAttention takes: equal to float rounding.
    assert len(feats) == len(ref)
    for a, b in zip(feats, ref, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


@pytest.fixture(scope="module")
def tiny_clip():
    return _clip(TINY)


@pytest.fixture(scope="module")
def tiny_file(tiny_clip, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file(tiny_clip.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def timm_config(tmp_path_factory):
    """A small open_clip config with a timm trunk, like BiomedCLIP's (``vit_base_patch16_224`` there)."""
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {
            "timm_model_name": "test_vit",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 160,
        },
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    path = tmp_path_factory.mktemp("configs") / f"{TIMM}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return TIMM


# ----------------------------------------------------------------------------------------------- features
def test_features_equal_open_clip_forward_intermediates(tiny_clip, tiny_file):
    enc = CLIPEncoder(TINY, pretrained=str(tiny_file), layers=(0, 2)).eval()
    images = _images()
    with torch.no_grad():
        feats = enc(images)
    _assert_equal(feats, _reference(tiny_clip, images, (0, 2)))
    assert [tuple(f.shape) for f in feats] == [(2, 64, 4, 4)] * 2
    assert enc.out_channels == [64, 64] and enc.width == 64 and enc.patch_size == 16


def test_blocks_after_the_deepest_are_removed():
    enc = CLIPEncoder(TINY, layers=(1, 0, 1))
    assert enc.layers == [0, 1]
    assert len(enc.visual.transformer.resblocks) == 2
    assert isinstance(enc.visual.ln_post, nn.Identity) and enc.visual.proj is None


def test_everything_frozen_without_adapters():
    enc = CLIPEncoder(TINY, layers=(1, 3))
    assert not any(p.requires_grad for p in enc.parameters())
    assert enc.adapter_state_dict() == {}


def test_only_adapters_trainable_and_adapter_state_dict():
    enc = CLIPEncoder(TINY, layers=(1, 3), adapter="mona")
    names = set(adapter_parameter_names(enc))
    assert names == {n for n, p in enc.named_parameters() if p.requires_grad}
    sd, full = enc.adapter_state_dict(), enc.state_dict()
    assert set(sd) == names and all(torch.equal(v, full[k]) for k, v in sd.items())
    assert all(k.startswith("visual.transformer.resblocks.") and ".mona_mlp." in k for k in sd)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layers": (4,)}, ValueError, r"layers=\[4\] must be block indices in \[0, 3\]"),
        ({"layers": ()}, ValueError, "must be block indices"),
        ({"model_name": "ViT-Nope"}, ValueError, "model_name='ViT-Nope' is not an open_clip model config"),
        ({"pretrained": "no_such_tag"}, ValueError, "neither an existing file nor a pretrained tag"),
        ({"pretrained": "missing/w.safetensors"}, PretrainedWeightsError, r"'missing/w.safetensors' does not exist"),
        ({"pretrained": "w.pt"}, PretrainedWeightsError, r"'w.pt' does not exist \(resolved to /"),
        ({"pretrained": ""}, ValueError, "pretrained='' is empty"),
        ({"model_name": "hf-hub:org/a", "pretrained": "hf-hub:org/b"}, ValueError, "two different Hub models"),
        ({"adapter_kwargs": {"r": 4}}, ValueError, "without an adapter"),
        ({"model_name": "RN50"}, ValueError, "ModifiedResNet vision tower"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        CLIPEncoder(**{"model_name": TINY, "layers": (1, 3), **kwargs})


def test_input_checks():
    enc = CLIPEncoder(TINY, layers=(1, 3))
    with pytest.raises(ValueError, match=r"must be \(B, 3, H, W\)"):
        enc(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"built for image_size=\(64, 64\)"):
        enc(torch.zeros(1, 3, 96, 96))


# ----------------------------------------------------------------------------------------------- weights files
@pytest.mark.parametrize("fmt", ["pt", "bin", "wrapped", "safetensors"])
def test_local_checkpoint_formats_load_exactly(fmt, tiny_clip, tmp_path):
    state = tiny_clip.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, path)
    elif fmt == "wrapped":  # a training checkpoint: {"state_dict": ...} saved from DataParallel, plus metadata
        path = tmp_path / "w.pt"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    else:
        path = tmp_path / f"w.{fmt}"
        torch.save(state, path)
    enc = CLIPEncoder(TINY, pretrained=str(path), layers=(1, 3)).eval()
    images = _images()
    with torch.no_grad():
        _assert_equal(enc(images), _reference(tiny_clip, images, (1, 3)))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": nn.Linear(1, 1)}, path)
    with pytest.raises(ValueError, match=r"weights_only=True"):
        load_checkpoint_file(path)


def test_torchscript_needs_opt_in_and_uses_quick_gelu(tmp_path):
    model = _clip(TINY, force_quick_gelu=True)  # OpenAI weights were trained with QuickGELU
    path = tmp_path / "openai-style.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notice
        torch.jit.save(torch.jit.script(copy.deepcopy(model)), str(path))
    assert is_torchscript_archive(path)
    with pytest.raises(ValueError, match="allow_unsafe_torchscript=True"):
        CLIPEncoder(TINY, pretrained=str(path), layers=(1, 3))
    enc = CLIPEncoder(TINY, pretrained=str(path), layers=(1, 3), allow_unsafe_torchscript=True).eval()
    assert isinstance(enc.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert enc.encoder_config["quick_gelu"] is True
    images = _images()
    with torch.no_grad():
        _assert_equal(enc(images), _reference(model, images, (1, 3)))


def test_tags_resolve_quick_gelu_without_download(monkeypatch, tmp_path):
    fetched = []
    monkeypatch.setattr(encoder_module, "download_pretrained", lambda cfg: fetched.append(cfg) or "weights.bin")
    for tag, quick in [("openai", True), ("metaclip_400m", True), ("laion2b_s34b_b88k", False)]:
        _, weights, quick_gelu, pre = encoder_module._resolve("ViT-B-16", tag, False)
        assert (weights, quick_gelu) == ("weights.bin", quick), tag
        assert "mean" in pre
    enc = CLIPEncoder(TINY, layers=(1, 3), quick_gelu=True)
    assert isinstance(enc.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)


def test_offline_tag_download_fails_with_a_hint():
    with pytest.raises(PretrainedWeightsError) as err:  # a RuntimeError: callers catching that still do
        CLIPEncoder("ViT-B-16", pretrained="openai")
    msg = str(err.value)
    assert "could not fetch the 'ViT-B-16' 'openai' weights" in msg
    assert "'timm/vit_base_patch16_clip_224.openai'" in msg and "'open_clip_model.safetensors'" in msg
    assert "HF_HUB_OFFLINE is set" in msg and "local weights file" in msg


def test_tower_for_loaded_weights_skips_random_init_only_when_safe(monkeypatch):
    cfg = open_clip.get_model_config(TINY)
    empty = _build_tower(cfg["embed_dim"], copy.deepcopy(cfg["vision_cfg"]), False, empty=True)
    assert all(p.device.type == "cpu" for p in empty.parameters())
    assert [k for k, _ in empty.named_parameters()] == [k for k, _ in _clip(TINY).visual.named_parameters()]

    class WithBuffer(nn.Module):  # a non-persistent buffer: no file fills it, so to_empty would leave garbage
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("table", torch.arange(3.0), persistent=False)

    monkeypatch.setattr(encoder_module, "_build_vision_tower", lambda *a, **k: WithBuffer())
    built = _build_tower(0, {}, False, empty=True)
    assert torch.equal(built.table, torch.arange(3.0))


@pytest.mark.slow
def test_vitb16_checkpoint_file_reproduces_outputs(tmp_path):
    """The path real pretrained weights take: a full open_clip ViT-B-16 state dict in a local file."""
    model = _clip("ViT-B-16")
    path = tmp_path / "vitb16.safetensors"
    save_file(model.state_dict(), path)
    enc = CLIPEncoder("ViT-B-16", pretrained=str(path)).eval()
    ref_state = model.visual.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in enc.visual.state_dict().items())
    images = _images(n=1, size=224)
    with torch.no_grad():
        _assert_equal(enc(images), _reference(model, images, (3, 6, 9)))
    assert enc.image_size == (224, 224) and enc.width == 768 and len(enc.visual.transformer.resblocks) == 10


# ----------------------------------------------------------------------------------------------- image size
def test_image_size_interpolates_position_embeddings_once(tiny_file):
    enc = CLIPEncoder(TINY, pretrained=str(tiny_file), image_size=96, adapter="mona", layers=(3,)).eval()
    assert enc.visual.positional_embedding.shape == (1 + 6 * 6, 64)
    with torch.no_grad():
        assert enc(_images(size=96))[0].shape == (2, 64, 6, 6)
    with pytest.raises(ValueError, match=r"built for image_size=\(96, 96\)"):
        enc(_images(size=64))


@pytest.fixture(scope="module")
def ramp_file(tiny_clip, tmp_path_factory):
    """The tiny CLIP with a known position embedding: class row 100, then on the 4 x 4 patch grid channel 0 = the
    column index (a ramp along the width), channel 1 = the row index (a ramp along the height), other channels 0."""
    state = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    pe = torch.zeros(1 + 16, 64)
    pe[0] = 100.0
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    pe[1:, 0], pe[1:, 1] = cols.flatten(), rows.flatten()
    state["visual.positional_embedding"] = pe
    path = tmp_path_factory.mktemp("ramp") / "ramp.safetensors"
    save_file(state, path)
    return path, pe


@pytest.mark.parametrize("keep_text", [False, True])
def test_non_square_image_size_interpolates_position_embeddings_by_value(ramp_file, keep_text):
    """Interpolation checked by values, not shape: at the file's own size the embedding is loaded unchanged; at
    64 x 128 px (grid 4 x 8) the class row stays apart (100, not blended), the height ramp is untouched, the width
    ramp is resampled to bicubic values (exact where the kernel does not reach the border: (j + 0.5) / 2 - 0.5),
    constant down each column, increasing along each row and symmetric about 1.5 (bicubic overshoots at the
    borders, to -0.09 and 3.09), and the zero channels stay zero. Both loading paths
    (visual tower, keep_text). The encoder then takes 64 x 128 inputs and gives (B, C, 4, 8) maps with Mona on the
    4 x 8 grid. Catches (H, W) recorded transposed and keep_text loading without interpolating."""
    path, pe = ramp_file
    same = CLIPEncoder(TINY, pretrained=str(path), layers=(1,), keep_text=keep_text)
    assert torch.equal(same.visual.positional_embedding, pe)  # same size: the identity, bit for bit
    enc = CLIPEncoder(
        TINY, pretrained=str(path), layers=(1,), keep_text=keep_text, image_size=(64, 128), adapter="mona"
    ).eval()
    assert enc.image_size == (64, 128) and enc.encoder_config["image_size"] == [64, 128]
    got = enc.visual.positional_embedding.detach()
    assert got.shape == (1 + 4 * 8, 64)
    assert torch.equal(got[0], pe[0])
    grid = got[1:].reshape(4, 8, 64)  # rows of 8 patches, as the tower lays them out
    assert torch.equal(grid[..., 2:], torch.zeros(4, 8, 62))
    torch.testing.assert_close(grid[..., 1], torch.arange(4.0)[:, None].expand(4, 8), atol=1e-5, rtol=0)
    width = grid[..., 0]
    assert torch.equal(width, width[:1].expand(4, 8))
    assert (width.diff(dim=1) > 0).all()
    torch.testing.assert_close(width + width.flip(1), torch.full((4, 8), 3.0), atol=1e-5, rtol=0)  # about 1.5
    torch.testing.assert_close(width[0, 3:5], torch.tensor([1.25, 1.75]), atol=1e-5, rtol=0)
    assert all(m.grid_size == (4, 8) for m in enc.modules() if isinstance(m, Mona))
    if not keep_text:
        with torch.no_grad():
            assert enc(torch.randn(2, 3, 64, 128))[0].shape == (2, 64, 4, 8)
        with pytest.raises(ValueError, match=r"built for image_size=\(64, 128\)"):
            enc(torch.randn(2, 3, 128, 64))


# ----------------------------------------------------------------------------------------------- keep_text
def test_keep_text_keeps_the_whole_model(tiny_clip, tiny_file, tmp_path):
    enc = CLIPEncoder(TINY, pretrained=str(tiny_file), layers=(1,), keep_text=True, adapter="lora").eval()
    assert enc.text_model is not None and enc.text_model.visual is enc.visual
    assert len(enc.visual.transformer.resblocks) == 4  # not pruned: encode_image needs every block
    tokens = open_clip.get_tokenizer(TINY)(["a hypoechoic lesion"])
    with torch.no_grad():
        torch.testing.assert_close(enc.text_model.encode_text(tokens), tiny_clip.encode_text(tokens))
    assert not any(p.requires_grad for n, p in enc.text_model.named_parameters() if not n.startswith("visual."))
    assert all(k.startswith("visual.") for k in enc.adapter_state_dict())
    save_adapters(enc, tmp_path / "a.safetensors")
    load_adapters(enc, tmp_path / "a.safetensors")


# ----------------------------------------------------------------------------------------------- timm trunks
def test_timm_block_structure_guard(timm_config):
    blk = _clip(timm_config).visual.trunk.blocks[0]
    for attr in TIMM_BLOCK_ATTRS:
        assert hasattr(blk, attr), f"timm Block lost {attr!r}"
    assert isinstance(blk.attn.qkv, nn.Linear) and blk.attn.qkv.out_features == 3 * blk.attn.qkv.in_features


def test_timm_trunk_features_and_checkpoint(timm_config, tmp_path):
    model = _clip(timm_config)
    path = tmp_path / "timm.safetensors"
    save_file(model.state_dict(), path)
    enc = CLIPEncoder(timm_config, pretrained=str(path), layers=(1, 3)).eval()
    assert len(enc.visual.trunk.blocks) == 4 and enc.width == 64 and enc.image_size == (160, 160)
    images = _images(size=160)
    with torch.no_grad():
        _assert_equal(enc(images), _reference(model, images, (1, 3)))


@pytest.mark.parametrize(("adapter", "wrapper"), [("lora", LoraQkvLinear), ("mona", MonaTimmBlock)])
def test_timm_trunk_adapters(timm_config, adapter, wrapper):
    torch.manual_seed(0)
    base = CLIPEncoder(timm_config, layers=(1, 3)).train()
    torch.manual_seed(0)
    kwargs = {"init": "zero", "placement": "both"} if adapter == "mona" else {"attn_targets": ["q", "k", "v", "out"]}
    enc = CLIPEncoder(timm_config, layers=(1, 3), adapter=adapter, adapter_kwargs=kwargs).train()
    assert sum(isinstance(m, wrapper) for m in enc.modules()) == 4
    images = _images(n=1, size=160)
    assert all(torch.equal(a, b) for a, b in zip(base(images), enc(images), strict=True))  # identity at init
    loss = sum(f.square().mean() for f in enc(images))
    loss.backward()
    grads = [p.grad for n, p in enc.named_parameters() if "lora_B" in n or "project2" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    if adapter == "mona":
        assert sum(isinstance(m, Mona) for m in enc.modules()) == 8
        assert all(m.num_prefix_tokens == 1 and m.grid_size == (10, 10) for m in enc.modules() if isinstance(m, Mona))
    else:
        enc.eval()
        with torch.no_grad():
            for p in enc.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
            unmerged = enc(images)
            merge_adapters(enc)
            for a, b in zip(unmerged, enc(images), strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("placement", ["mlp", "attn"])
def test_timm_mona_placement_takes_the_residual_stream_it_names(timm_config, placement):
    """On a timm trunk (BiomedCLIP), Mona after the MLP sees the whole block's output and Mona after attention the
    attention residual only (reference init, so placement changes the output). Catches the "mlp" Mona run before
    the MLP residual, which the identity-at-init test (init='zero') cannot see."""
    torch.manual_seed(0)
    enc = CLIPEncoder(timm_config, layers=(1,), adapter="mona", adapter_kwargs={"placement": placement}).eval()
    block = next(m for m in enc.modules() if isinstance(m, MonaTimmBlock))
    mona = block.mona_mlp if placement == "mlp" else block.mona_attn
    assert mona is not None and (block.mona_attn if placement == "mlp" else block.mona_mlp) is None
    seen: dict[str, torch.Tensor] = {}
    block.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    mona.register_forward_pre_hook(lambda module, args: seen.setdefault("mona_in", args[0]))
    with torch.no_grad():
        enc(_images(n=1, size=160))
        b, x = block.base_layer, seen["x"]
        after_attn = x + b.ls1(b.attn(b.norm1(x)))
        expected = after_attn + b.ls2(b.mlp(b.norm2(after_attn))) if placement == "mlp" else after_attn
    torch.testing.assert_close(seen["mona_in"], expected, atol=1e-5, rtol=0)


def test_timm_trunk_image_size(timm_config, tmp_path):
    model = _clip(timm_config)
    path = tmp_path / "timm.safetensors"
    save_file(model.state_dict(), path)
    enc = CLIPEncoder(timm_config, pretrained=str(path), image_size=192, layers=(2,), adapter="mona").eval()
    assert enc.image_size == (192, 192)
    with torch.no_grad():
        assert enc(_images(n=1, size=192))[0].shape == (1, 64, 12, 12)
    with pytest.raises(ValueError, match=r"built for image_size=\(192, 192\)"):
        enc(_images(n=1, size=160))
