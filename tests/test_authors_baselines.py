"""The authors' baselines (usclip/models/authors_baselines.py) against forwards written here from their code.

Each reference below is re-written from the authors' later code (github.com/jinggqu/NextGen-UIA, ``src/``) in plain
torch, reads the authors' own parameter names, and gets the same random weights as usclip's model (through the
weight-file formats and converters under test); outputs must agree within 1e-5. Tiny sizes: a 6-block ViT of width 32
with 14 px patches at 56 px (a 4 x 4 grid, so the decoder's 64 px map is resized to 56 as their 592 px map is to 518).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from usclip.models.authors import load_authors_checkpoint
from usclip.models.authors_baselines import (
    AuthorsUNet,
    DINOv2Classifier,
    DINOv2Segmenter,
    convert_authors_baseline,
    convert_dinov2_classification,
    convert_dinov2_segmentation,
    convert_resnet_classifier,
    convert_unet,
)
from usclip.models.baselines import build_native_model
from usclip.models.encoder import PretrainedWeightsError
from usclip.tasks import ClassificationTask, SegmentationTask

D, DEPTH, HEADS, PATCH, SIZE = 32, 6, 2, 14, 56
GRID = SIZE // PATCH
#: the key their setup_decoders gives the one decoder (f"unet:lr={1e-4:.10f}" with "." -> "_")
DECODER = "decoders_dict.unet:lr=0_0001000000."


def _rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape) * scale


def _bn(prefix: str, c: int) -> dict[str, torch.Tensor]:
    return {
        prefix + "weight": 1 + _rand(c),
        prefix + "bias": _rand(c),
        prefix + "running_mean": _rand(c),
        prefix + "running_var": 0.5 + torch.rand(c),
        prefix + "num_batches_tracked": torch.tensor(7),
    }


def _release_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A DINOv2 weights file in Facebook's release format (dinov2_vitb14_pretrain.pth), tiny, random."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    sd: dict[str, torch.Tensor] = {
        "cls_token": _rand(1, 1, D),
        "pos_embed": _rand(1, GRID * GRID + 1, D),
        "mask_token": _rand(1, D),
        "patch_embed.proj.weight": _rand(D, 3, PATCH, PATCH, scale=0.05),
        "patch_embed.proj.bias": _rand(D),
        "norm.weight": 1 + _rand(D),
        "norm.bias": _rand(D),
    }
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd |= {
            p + "norm1.weight": 1 + _rand(D),
            p + "norm1.bias": _rand(D),
            p + "attn.qkv.weight": _rand(3 * D, D),
            p + "attn.qkv.bias": _rand(3 * D),
            p + "attn.proj.weight": _rand(D, D),
            p + "attn.proj.bias": _rand(D),
            p + "ls1.gamma": 0.5 + torch.rand(D, generator=g),
            p + "norm2.weight": 1 + _rand(D),
            p + "norm2.bias": _rand(D),
            p + "mlp.fc1.weight": _rand(4 * D, D),
            p + "mlp.fc1.bias": _rand(4 * D),
            p + "mlp.fc2.weight": _rand(D, 4 * D),
            p + "mlp.fc2.bias": _rand(D),
            p + "ls2.gamma": 0.5 + torch.rand(D, generator=g),
        }
    path = tmp_path / "dinov2_vitb14_pretrain.pth"
    torch.save(sd, path)
    return path, sd


def _their_intermediate_layers(sd: dict[str, torch.Tensor], x: torch.Tensor, n: int, layer_scale: bool) -> list:
    """Their ``get_intermediate_layers(x, n, return_class_token=True)`` (norm=True): [(patches, cls)] of the last n.

    Their ViT (later:src/third_party/dino/vision_transformer.py) built by ``vit_base(img_size, patch_size)`` has no
    ``init_values``, hence no layer scale (``layer_scale=False``); ``True`` is DINOv2 as released.
    """
    b, hd = len(x), D // HEADS
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), t], dim=1) + sd["pos_embed"]
    outs = []
    for i in range(DEPTH):
        p = f"blocks.{i}."
        h = F.layer_norm(t, (D,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        q, k, v = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).view(b, -1, 3, HEADS, hd).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, heads, N, hd)
        a = ((q * hd**-0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        a = F.linear(a.transpose(1, 2).reshape(b, -1, D), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        t = t + (a * sd[p + "ls1.gamma"] if layer_scale else a)
        h = F.layer_norm(t, (D,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        m = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"])
        m = m + sd[p + "mlp.fc2.bias"]
        t = t + (m * sd[p + "ls2.gamma"] if layer_scale else m)
        outs.append(t)
    normed = [F.layer_norm(o, (D,), sd["norm.weight"], sd["norm.bias"], eps=1e-6) for o in outs[-n:]]
    return [(o[:, 1:], o[:, 0]) for o in normed]


def _their_decoder_state() -> dict[str, torch.Tensor]:
    """Random weights under the keys of their saved ``decoders.state_dict()`` (UNetDecoder with in_channels=D)."""
    torch.manual_seed(1)
    sd: dict[str, torch.Tensor] = {}
    dims = [D, D // 2, D // 4, D // 8, 2]
    for i in range(4):
        p, cin, cout = f"{DECODER}up{i + 1}.", dims[i], dims[i + 1]
        sd |= {p + "upconv.weight": _rand(cin, cout, 2, 2), p + "upconv.bias": _rand(cout)}
        sd |= {p + "conv.0.weight": _rand(cout, 2 * cout, 3, 3), p + "conv.0.bias": _rand(cout)}
        sd |= _bn(p + "conv.1.", cout)
        sd |= {p + "skip_conv.0.weight": _rand(cout, D, 3, 3), p + "skip_conv.0.bias": _rand(cout)}
        sd |= _bn(p + "skip_conv.1.", cout)
    return sd


def _their_segmentation(sd: dict, dec: dict, x: torch.Tensor, layer_scale: bool) -> torch.Tensor:
    """Their UNetDecoder (later:src/third_party/dino/dinov2.py:130-200) in eval mode over their encoder's 5 blocks."""

    def bn_relu(y: torch.Tensor, p: str) -> torch.Tensor:
        y = F.batch_norm(y, dec[p + "running_mean"], dec[p + "running_var"], dec[p + "weight"], dec[p + "bias"])
        return F.relu(y)

    feats = _their_intermediate_layers(sd, x, 5, layer_scale)
    maps = [f[0].reshape(-1, GRID, GRID, D).permute(0, 3, 1, 2) for f in feats]
    y = maps[4]
    for i, skip in enumerate([maps[3], maps[2], maps[1], maps[0]]):
        p = f"{DECODER}up{i + 1}."
        y = F.conv_transpose2d(y, dec[p + "upconv.weight"], dec[p + "upconv.bias"], stride=2)
        s = F.conv2d(skip, dec[p + "skip_conv.0.weight"], dec[p + "skip_conv.0.bias"], padding=1)
        s = bn_relu(s, p + "skip_conv.1.")
        s = nn.Upsample(scale_factor=y.size(2) / s.size(2), mode="bilinear", align_corners=True)(s)
        y = F.conv2d(torch.cat([y, s], 1), dec[p + "conv.0.weight"], dec[p + "conv.0.bias"], padding=1)
        y = bn_relu(y, p + "conv.1.")
    resize = torchvision.transforms.Resize((SIZE, SIZE), interpolation=torchvision.transforms.InterpolationMode.BICUBIC)
    return resize(y)


# ------------------------------------------------------------------------------------------------------------ DINOv2
@pytest.mark.parametrize("layer_scale", [True, False])
def test_dinov2_release_file_loads_as_pretrained(tmp_path: Path, layer_scale: bool):
    path, sd = _release_file(tmp_path)
    net, mean, _ = build_native_model(
        "segmentation", "dinov2:test", 2, str(path), SIZE, options={"layer_scale": layer_scale}
    )
    state = net.backbone.state_dict()
    expected = {k: v for k, v in sd.items() if k != "mask_token" and (layer_scale or ".ls" not in k)}
    assert set(state) == set(expected)  # mask_token dropped (timm's filter); gammas only with layer scale
    for k, v in expected.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)
    assert mean == pytest.approx((0.485, 0.456, 0.406))
    assert not any(p.requires_grad for p in net.backbone.parameters())
    # another image size: the 4 x 4 position grid is resampled to 3 x 3, the class position kept
    small, _, _ = build_native_model("classification", "dinov2:test", 2, str(path), 42)
    assert small.backbone.pos_embed.shape == (1, 10, D)
    torch.testing.assert_close(small.backbone.pos_embed[0, 0], sd["pos_embed"][0, 0])


def test_dinov2_segmentation_equals_the_authors_forward(tmp_path: Path):
    path, sd = _release_file(tmp_path)
    dec = _their_decoder_state()
    x = torch.rand(2, 3, SIZE, SIZE)
    outs = {}
    for layer_scale in (False, True):
        task = SegmentationTask(
            model_name="dinov2:test",
            pretrained=str(path),
            head="native",
            image_size=SIZE,
            native_kwargs={"layer_scale": layer_scale},
            normalization="none",
        )
        assert isinstance(task.net, DINOv2Segmenter)
        task.net.load_state_dict(convert_dinov2_segmentation(dec, task.net), strict=True)
        trainable = {n for n, p in task.named_parameters() if p.requires_grad}
        assert trainable and all(n.startswith("net.decoder.") for n in trainable)
        task.train()
        assert not task.net.backbone.training and task.net.decoder.training  # their feature_model.eval()
        with torch.no_grad():
            outs[layer_scale] = task.eval()(x)
            ref = _their_segmentation(sd, dec, x, layer_scale)
        assert outs[layer_scale].shape == (2, 2, SIZE, SIZE)
        torch.testing.assert_close(outs[layer_scale], ref, rtol=0, atol=1e-5)
    assert (outs[True] - outs[False]).abs().max() > 1e-2  # the switch changes the model
    with torch.no_grad():  # another input size: resized to the model's, logits resized back
        assert task(torch.rand(1, 3, 42, 70)).shape == (1, 2, 42, 70)
    with pytest.raises(ValueError, match="one decoder"):
        convert_dinov2_segmentation({**dec, **{k.replace("0_0001", "0_0002"): v for k, v in dec.items()}}, task.net)
    bad = {**dec, DECODER + "up4.upconv.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"up4.upconv.bias has shape \(3,\)"):
        convert_dinov2_segmentation(bad, task.net)


@pytest.mark.parametrize("n", [4, 1])
def test_dinov2_classification_equals_the_authors_forward(tmp_path: Path, n: int):
    path, sd = _release_file(tmp_path)
    torch.manual_seed(2)
    theirs = {"linear.weight": _rand(3, (n + 1) * D), "linear.bias": _rand(3)}
    task = ClassificationTask(
        model_name="dinov2:test",
        pretrained=str(path),
        head="native",
        image_size=SIZE,
        num_classes=3,
        native_kwargs={"layer_scale": False, "n_last_blocks": n},
        normalization="none",
    )
    assert isinstance(task.net, DINOv2Classifier)
    assert task.net.classifier.linear.weight.std().item() == pytest.approx(0.01, rel=0.3)  # their init, N(0, 0.01)
    task.net.load_state_dict(convert_dinov2_classification(theirs, task.net), strict=True)
    x = torch.rand(2, 3, SIZE, SIZE)
    feats = _their_intermediate_layers(sd, x, n, layer_scale=False)
    joined = torch.cat([c for _, c in feats] + [feats[-1][0].mean(dim=1)], dim=1)  # [cls_1..cls_n, avg patches_n]
    with torch.no_grad():
        torch.testing.assert_close(task.eval()(x), F.linear(joined, theirs["linear.weight"], theirs["linear.bias"]))
    with pytest.raises(ValueError, match=r"linear\.weight has shape"):
        convert_dinov2_classification({**theirs, "linear.weight": _rand(3, (n + 2) * D)}, task.net)


# -------------------------------------------------------------------------------------------------------------- UNet
class _TheirConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, p: float) -> None:
        super().__init__()
        self.conv_conv = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(), nn.Dropout(p),
            nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_conv(x)


def _their_unet(init: int = 16, classes: int = 2) -> nn.Module:
    """Their UNet (later:src/third_party/unet.py) re-written compactly: the same module tree, hence the same keys."""
    block = _TheirConvBlock
    c, drop = [init * 2**i for i in range(5)], [0.05, 0.1, 0.2, 0.3, 0.5]
    net, enc, dec = nn.Module(), nn.Module(), nn.Module()
    enc.in_conv = block(3, c[0], drop[0])
    for i in range(1, 5):
        down = nn.Module()
        down.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), block(c[i - 1], c[i], drop[i]))
        setattr(enc, f"down{i}", down)
    for i in range(1, 5):
        up = nn.Module()
        up.up, up.conv = nn.ConvTranspose2d(c[5 - i], c[4 - i], 2, stride=2), block(2 * c[4 - i], c[4 - i], 0.0)
        setattr(dec, f"up{i}", up)
    dec.out_conv = nn.Conv2d(c[0], classes, 3, padding=1)
    net.encoder, net.decoder = enc, dec
    return net


def _their_unet_forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    e, d = net.encoder, net.decoder
    feats = [e.in_conv(x)]
    for i in range(1, 5):
        feats.append(getattr(e, f"down{i}").maxpool_conv(feats[-1]))
    y = feats[4]
    for i in range(1, 5):
        up = getattr(d, f"up{i}")
        y = up.conv(torch.cat([feats[4 - i], up.up(y)], dim=1))  # skip first, then the up-sampled map
    return d.out_conv(y)


def _randomise(net: nn.Module) -> None:
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                t.copy_(0.5 + torch.rand_like(t) if name.endswith("running_var") else torch.randn_like(t) * 0.2)


def test_unet_equals_the_authors_unet(tmp_path: Path):
    """Their saved UNet (``best_model.pth``) loads through the one entry point for every authors' checkpoint and
    computes their forward, dropout included."""
    torch.manual_seed(3)
    theirs = _their_unet()
    _randomise(theirs)
    task = SegmentationTask(model_name="unet", pretrained=None, head="native", image_size=32, normalization="none")
    assert isinstance(task.net, AuthorsUNet)
    assert {k: v.shape for k, v in task.net.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    torch.save(theirs.state_dict(), tmp_path / "best_model.pth")
    loaded = load_authors_checkpoint(task, tmp_path / "best_model.pth")
    assert set(loaded) == {f"net.{k}" for k in theirs.state_dict()}
    assert all(p.requires_grad for p in task.parameters())  # trained from scratch, end to end
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(task.eval()(x), _their_unet_forward(theirs.eval(), x), rtol=0, atol=1e-5)
        torch.manual_seed(4)  # training mode: the same dropout masks only if every rate and place is theirs
        ours = task.train()(x)
        torch.manual_seed(4)
        torch.testing.assert_close(ours, _their_unet_forward(theirs.train(), x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit AuthorsUNet"):
        convert_unet(_their_unet(init=8).state_dict(), task.net)
    with pytest.raises(ValueError, match="multiples of 16"):
        task(torch.rand(1, 3, 40, 40))


# ---------------------------------------------------------------------------------------------------------- ResNet18
def _torchvision_resnet18(classes: int) -> nn.Module:
    net = torchvision.models.resnet18(weights=None, num_classes=classes)  # their weights=DEFAULT, without the download
    _randomise(net)
    return net.eval()


def test_torchvision_resnet18_file_loads_and_the_authors_classifier_converts(tmp_path: Path):
    torch.manual_seed(5)
    tv = _torchvision_resnet18(1000)
    imagenet = tv.state_dict()
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(imagenet, path)
    task = ClassificationTask(model_name="timm:resnet18", pretrained=str(path), head="native", image_size=32)
    ours = task.net.state_dict()
    assert ours["fc.weight"].shape == (2, 512)  # ImageNet's classifier left out, the new one initialised
    for k, v in imagenet.items():
        if not k.startswith("fc."):
            torch.testing.assert_close(ours[k], v, rtol=0, atol=0, msg=k)
    # their prepare_model: model.fc = Linear(512, num_classes); their best_model.pth is the whole state dict
    tv.fc = nn.Linear(512, 2)
    task.net.load_state_dict(convert_authors_baseline(tv.state_dict(), task.net), strict=True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(task.net.eval()(x), tv(x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"fc.weight has shape \(1000, 512\)"):
        convert_resnet_classifier(imagenet, task.net)
    with pytest.raises(ValueError, match="no converter for Linear"):
        convert_authors_baseline({}, nn.Linear(2, 2))


def test_timm_classifier_passes_the_weights_tag(monkeypatch):
    """``pretrained: tv_in1k`` reaches timm as ``resnet18.tv_in1k`` (it was dropped: timm's default tag loaded)."""
    import timm

    names: list[str] = []
    real = timm.create_model

    def spy(name: str, pretrained: bool = False, **kwargs):
        names.append(name)
        return real(name.split(".")[0], pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    build_native_model("classification", "timm:resnet18", 2, "tv_in1k")
    build_native_model("classification", "timm:resnet18", 2, "timm")
    assert names == ["resnet18.tv_in1k", "resnet18"]


# ------------------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model_name": "dinov2:test", "native_kwargs": {"depth": 3}}, r"native_kwargs \['depth'\] are not options"),
        ({"model_name": "unet", "native_kwargs": {"layer_scale": False}}, r"it takes \['init_channels'\]"),
        ({"model_name": "dinov2:test", "image_size": 64}, "multiple of 14"),
        ({"model_name": "dinov2:vitb99"}, r"arch in \["),
        ({"model_name": "dinov2:test", "native_kwargs": {"n_last_blocks": 2}}, "n_last_blocks is for classification"),
        ({"model_name": "unet", "pretrained": "imagenet"}, "trains from scratch"),
        ({"model_name": "usclip-test-vit", "head": "paper", "native_kwargs": {"x": 1}}, "head='paper' takes none"),
    ],
)
def test_authors_baseline_errors(kwargs: dict, match: str):
    args = {"pretrained": None, "head": "native", "image_size": SIZE, "layers": [0], **kwargs}
    with pytest.raises(ValueError, match=match):
        SegmentationTask(**args)


def test_missing_release_file_says_what_it_is(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PretrainedWeightsError, match=r"dinov2_vitb14_pretrain.pth.*does not exist.*DINOv2 ViT-B/14"):
        SegmentationTask(model_name="dinov2:vitb14", pretrained="ckpt/dinov2_vitb14_pretrain.pth", head="native")


def test_the_authors_unet_is_a_reference_row_and_their_dinov2_is_ranked():
    from usclip.run_results import _is_reference_config

    def config(name: str) -> dict:
        return {"model": {"init_args": {"model_name": name, "head": "native"}}}

    assert _is_reference_config(config("unet")) and _is_reference_config(config("timm:resnet18"))
    assert not _is_reference_config(config("dinov2:vitb14"))


def test_checkpoints_leave_out_the_frozen_dinov2_backbone(tmp_path: Path):
    """The release weights are reloaded from ``pretrained`` (fingerprint checked), as for the CLIP encoder."""
    path, _ = _release_file(tmp_path)
    args = {"model_name": "dinov2:test", "pretrained": str(path), "head": "native", "image_size": SIZE}
    task = SegmentationTask(**args)
    checkpoint = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all(k.startswith("net.decoder.") for k in checkpoint["state_dict"])
    again = SegmentationTask(**args)
    again.on_load_checkpoint(checkpoint)
    again.load_state_dict(checkpoint["state_dict"], strict=True)
    torch.testing.assert_close(again.state_dict(), task.state_dict(), rtol=0, atol=0)


def test_timm_encoder_reads_a_release_format_file_too(tmp_path: Path):
    """``timm:<dinov2>`` under the paper's head loads Facebook's format through the same filter (mask_token dropped)."""
    from usclip.models.baselines import TimmEncoder

    enc = TimmEncoder("test_vit", None, layers=[0], image_size=64)
    state = {k: torch.randn_like(v) for k, v in enc.model.state_dict().items()}
    path = tmp_path / "release.pth"
    torch.save({**state, "mask_token": torch.zeros(1, state["cls_token"].shape[-1])}, path)
    loaded = TimmEncoder("test_vit", str(path), layers=[0], image_size=64).model.state_dict()
    for k, v in state.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0, msg=k)
