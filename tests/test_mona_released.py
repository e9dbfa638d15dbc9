"""``MonaConfig(placement="released")``: Mona as the paper-release code runs it, checked against that code's forward.

The reference below is written from ``release:models/openai/model.py`` (``MonaOp`` 10-35, ``Mona`` 38-76,
``ResidualAttentionBlock`` 246-286), sequence-first as there, with its parameter names: the usclip block's state
dict, less ``base_layer.``, loads into it strictly, so the names map one to one.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import usclip.models  # noqa: F401  (registers usclip-test-vit)
from usclip.adapters import Mona, MonaBlock, MonaConfig, MonaTimmBlock, count_parameters, load_adapters, save_adapters
from usclip.cli import main
from usclip.models import CLIPEncoder

TINY = "usclip-test-vit"  # width 64, 4 heads, 4 blocks, 4 x 4 patch grid at 64 px
LAYERS = (1, 3)
HIDDEN = 8  # != width, so a transposed projection fails on shape or value
ROOT = Path(__file__).resolve().parents[1]
RELEASED = ROOT / "configs" / "adapters" / "mona_released.yaml"


# ----------------------------------------------------------------------------------------------- the release's code
class _ReleaseMonaOp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv3 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.projector = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (self.conv1(x) + self.conv2(x) + self.conv3(x)) / 3.0 + x
        return x + self.projector(x)


class _ReleaseMona(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.project1 = nn.Linear(dim, hidden)
        self.project2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)
        self.adapter_conv = _ReleaseMonaOp(hidden)
        self.norm = nn.LayerNorm(dim)
        self.gamma = nn.Parameter(torch.ones(dim) * 1e-6)
        self.gammax = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:  # x: (L, N, D)
        class_token, identity = x[:1], x[1:]
        x = x[1:].permute(1, 0, 2)
        x = self.norm(x) * self.gamma + x * self.gammax
        p = self.project1(x)
        b, n, c = p.shape
        p = self.adapter_conv(p.reshape(b, hw[0], hw[1], c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(b, n, c)
        p = self.project2(self.dropout(F.gelu(p))).permute(1, 0, 2)
        return torch.cat([class_token, identity], dim=0) + torch.cat([class_token, p], dim=0)


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _ReleaseBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads)  # sequence-first, as there
        self.ln_1 = nn.LayerNorm(dim)
        mlp = [("c_fc", nn.Linear(dim, 4 * dim)), ("gelu", _QuickGELU()), ("c_proj", nn.Linear(4 * dim, dim))]
        self.mlp = nn.Sequential(OrderedDict(mlp))
        self.ln_2 = nn.LayerNorm(dim)
        self.mona = _ReleaseMona(dim, hidden, dropout)

    def forward(self, x: torch.Tensor, second: nn.Module | None = None) -> torch.Tensor:
        """``second``: another module for the second application (to split the gradient of the two calls)."""
        n = x.shape[0] - 1
        h = w = int(n**0.5)
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        if h * w == n:
            x = self.mona(x, (h, w))
        x = x + self.mlp(self.ln_2(x))
        if h * w == n:
            x = (second or self.mona)(x, (h, w))
        return x


# ----------------------------------------------------------------------------------------------- helpers
def _encoder(dropout: float = 0.1, seed: int = 0, **kwargs) -> CLIPEncoder:
    torch.manual_seed(seed)
    kw = {"placement": "released", "hidden_dim": HIDDEN, "dropout": dropout, **kwargs}
    return CLIPEncoder(TINY, layers=LAYERS, adapter="mona", adapter_kwargs=kw, quick_gelu=True)


@torch.no_grad()
def _randomise(enc: CLIPEncoder, seed: int = 3) -> None:
    """Every tensor away from its init: LayerNorms not (1, 0), biases not 0, gamma not 1e-6, so each one shows."""
    g = torch.Generator().manual_seed(seed)
    for name, p in enc.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if name.endswith(("gamma", "gammax")) or ".ln_" in name or ".norm." in name:
            p.copy_(0.5 + 0.2 * noise)
        else:
            p.add_(0.05 * noise)


def _blocks(enc: CLIPEncoder) -> list[MonaBlock]:
    return [m for m in enc.visual.transformer.resblocks if isinstance(m, MonaBlock)]


def _release_blocks(enc: CLIPEncoder, dropout: float) -> list[_ReleaseBlock]:
    """The release's blocks holding the usclip blocks' tensors (strict load: the names are the release's)."""
    out = []
    for blk in _blocks(enc):
        ref = _ReleaseBlock(enc.width, blk.base_layer.attn.num_heads, HIDDEN, dropout)
        state = {k.removeprefix("base_layer."): v for k, v in blk.state_dict().items()}
        ref.load_state_dict(state, strict=True)
        out.append(ref.train(blk.training))
    return out


def _embedded(enc: CLIPEncoder, images: torch.Tensor) -> torch.Tensor:
    """The tokens entering block 0, ``(B, 1 + N, C)``."""
    seen = {}

    def hook(module, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["q_x"]).detach()

    handle = enc.visual.transformer.resblocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        enc(images)
    handle.remove()
    return seen["x"]


def _release_features(refs, x: torch.Tensor, layers=LAYERS, split=None) -> list[torch.Tensor]:
    """Patch features ``(B, C, gh, gw)`` of ``layers`` from the release's blocks; ``split``: second-call modules."""
    x = x.permute(1, 0, 2)  # NLD -> LND, as the release's transformer
    feats = []
    for i, ref in enumerate(refs[: max(layers) + 1]):
        x = ref(x, None if split is None else split[i])
        if i in layers:
            n, b, c = x[1:].shape
            side = int(n**0.5)
            feats.append(x[1:].permute(1, 2, 0).reshape(b, c, side, side))
    return feats


def _images(n: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize(("mode", "dropout"), [("train", 0.0), ("eval", 0.1)])
def test_released_equals_the_release_code(mode, dropout):
    """The encoder's features equal the release's blocks run in sequence, to 1e-5, in training (dropout 0) and in
    evaluation (dropout 0.1, off). Catches no doubling, the class token sent through Mona, two modules, Mona once."""
    enc = _encoder(dropout)
    _randomise(enc)
    enc.train(mode == "train")
    images = _images()
    refs = _release_blocks(enc, dropout)
    x0 = _embedded(enc, images)
    with torch.no_grad():
        got = enc(images)
        want = _release_features(refs, x0)
    assert len(got) == len(want) == 2
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape == (2, 64, 4, 4)
        assert (a - b).abs().max().item() <= 1e-5
    # control: the same weights with the class token adapted instead of doubled give other features
    with torch.no_grad():
        for blk in _blocks(enc):
            blk.mona.prefix = "adapt"
        assert max((a - b).abs().max().item() for a, b in zip(enc(images), want, strict=True)) > 1e-3


def test_class_token_bypasses_mona_and_doubles_at_each_application():
    """In a block the class token ``c`` leaves as ``2 (2 (c + a) + mlp(ln_2(2 (c + a))))`` and depends on no Mona
    weight, while the patch tokens do. Catches the doubling dropped (``c + a + ...``) or the class token adapted."""
    enc = _encoder(dropout=0.0)
    _randomise(enc)
    enc.eval()
    block = _blocks(enc)[0]
    ref = _release_blocks(enc, 0.0)[0].eval()
    x = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = block(x)
        y = ref.ln_1(x.permute(1, 0, 2))
        h = (x.permute(1, 0, 2) + ref.attn(y, y, y, need_weights=False)[0])[0]  # (B, C): after the attention residual
        c1 = 2 * h
        want = 2 * (c1 + ref.mlp(ref.ln_2(c1)))
        torch.testing.assert_close(out[:, 0], want, atol=1e-5, rtol=1e-6)
        before = out.clone()
        for p in block.mona.parameters():
            p.add_(1.0)
        after = block(x)
    assert torch.equal(after[:, 0], before[:, 0])
    assert (after[:, 1:] - before[:, 1:]).abs().min() > 0


def test_one_shared_module_per_block_under_the_release_names():
    enc = _encoder()
    for i, blk in enumerate(_blocks(enc)):
        assert blk.mona is not None and blk.mona_attn is None and blk.mona_mlp is None
        assert sum(isinstance(m, Mona) for m in blk.modules()) == 1
        prefix = f"visual.transformer.resblocks.{i}."
        keys = sorted(k for k in enc.adapter_state_dict() if k.startswith(prefix))
        assert keys == [f"{prefix}mona.{n}" for n in sorted(_ReleaseMona(64, HIDDEN, 0.0).state_dict())]
    assert len(_blocks(enc)) == 4
    # as many trainable tensors as one Mona after the MLP; ViT-B/16's Mona is 111,872 parameters per block
    mlp = CLIPEncoder(TINY, layers=LAYERS, adapter="mona", adapter_kwargs={"hidden_dim": HIDDEN})
    assert count_parameters(enc)[0] == count_parameters(mlp)[0] == 4 * sum(p.numel() for p in Mona(64, 8).parameters())
    assert sum(p.numel() for p in Mona(768).parameters()) == 111_872


def test_the_shared_module_gets_the_gradient_of_both_applications():
    """The shared weights' gradient is the sum of the gradients of the two calls (computed on the release's blocks
    with a copy of Mona for the second call), and both parts are non-zero. Catches Mona applied once, or twice
    with one call detached."""
    enc = _encoder(dropout=0.0)
    _randomise(enc)
    enc.train()
    images = _images()
    x0 = _embedded(enc, images)
    sum(f.square().mean() for f in enc(images)).backward()
    refs = _release_blocks(enc, 0.0)
    seconds = [copy.deepcopy(r.mona) for r in refs]
    sum(f.square().mean() for f in _release_features(refs, x0, split=seconds)).backward()
    for blk, ref, second in zip(_blocks(enc), refs, seconds, strict=True):
        firsts = dict(ref.mona.named_parameters())
        for name, p in second.named_parameters():
            first = firsts[name].grad
            assert first.abs().sum() > 0 and p.grad.abs().sum() > 0, name
            got = dict(blk.mona.named_parameters())[name].grad
            torch.testing.assert_close(got, first + p.grad, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- files and errors
def test_adapter_files_of_another_placement_refuse_to_load(tmp_path):
    released, mlp = tmp_path / "released.safetensors", tmp_path / "mlp.safetensors"
    save_adapters(_encoder(), released)
    save_adapters(CLIPEncoder(TINY, layers=LAYERS, adapter="mona", adapter_kwargs={"hidden_dim": HIDDEN}), mlp)
    with pytest.raises(ValueError, match="placement='released' in the file but placement='mlp' in the module"):
        load_adapters(CLIPEncoder(TINY, layers=LAYERS, adapter="mona", adapter_kwargs={"hidden_dim": HIDDEN}), released)
    with pytest.raises(ValueError, match="placement='mlp' in the file but placement='released' in the module"):
        load_adapters(_encoder(), mlp)
    both = CLIPEncoder(TINY, layers=LAYERS, adapter="mona", adapter_kwargs={"hidden_dim": HIDDEN, "placement": "both"})
    with pytest.raises(ValueError, match="placement='released' in the file but placement='both'"):
        load_adapters(both, released)


def test_released_needs_one_class_token_and_a_square_grid():
    with pytest.raises(ValueError, match=r"placement='released'.*grid \(4, 6\).*placement='both'"):
        CLIPEncoder(TINY, layers=LAYERS, image_size=(64, 96), adapter="mona", adapter_kwargs={"placement": "released"})


def test_released_on_a_timm_trunk(tmp_path):
    """BiomedCLIP's timm blocks take the same form: one shared module, the class token doubled at each call."""
    name = "usclip-test-timm-released"
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 160},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }  # fmt: skip
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(0)
    enc = CLIPEncoder(name, layers=(0,), adapter="mona", adapter_kwargs={"placement": "released"}).eval()
    block = next(m for m in enc.modules() if isinstance(m, MonaTimmBlock))
    assert block.mona is not None and block.mona_attn is None and block.mona_mlp is None
    b = block.base_layer
    x = torch.randn(1, 1 + 100, b.norm1.normalized_shape[0], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        c1 = 2 * (x + b.ls1(b.attn(b.norm1(x))))[:, :1]
        want = 2 * (c1 + b.ls2(b.mlp(b.norm2(c1))))
        torch.testing.assert_close(block(x)[:, :1], want, atol=1e-5, rtol=1e-6)


# ----------------------------------------------------------------------------------------------- the shipped overlay
def test_released_overlay_resolves_to_the_release_setting(tmp_path):
    """As a second --config after a tiny LoRA config (whose kwargs must not leak into Mona's)."""
    args = ["--config", str(ROOT / "tests" / "conf" / "segmentation_lora.yaml"), "--config", str(RELEASED)]
    args += [f"--data.init_args.root={tmp_path / 'data'}", f"--trainer.default_root_dir={tmp_path}"]
    cli = main(args, run=False)
    cfg = cli.model.encoder.adapter_config
    assert isinstance(cfg, MonaConfig)
    fields = (cfg.hidden_dim, cfg.placement, cfg.dropout, cfg.init, cfg.variant)
    assert fields == (64, "released", 0.1, "mona", "baseline")
    blocks = [m for m in cli.model.encoder.modules() if isinstance(m, MonaBlock)]
    assert blocks and all(b.mona is not None and b.mona.prefix == "double" and b.mona_mlp is None for b in blocks)
    assert all(b.mona.dropout.p == 0.1 for b in blocks)
