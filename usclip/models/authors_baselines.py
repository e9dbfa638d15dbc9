"""The authors' baselines as they ran them: DINOv2 with their decoder and classifier, their UNet, and converters.

Read from the authors' later code (github.com/jinggqu/NextGen-UIA, ``src/``); docs/baselines.md states what each
model is and what it costs, docs/adapters.md the differences from usclip's own baselines. Selected with
``head: native`` (:func:`usclip.models.baselines.build_native_model`):

* ``dinov2:<arch>`` (``vits14``, ``vitb14``, ``vitl14``, ``vitg14``; ``test`` is a tiny random stand-in for tests):
  a frozen DINOv2 ViT (timm's implementation, the same weights) under the authors' decoder. Segmentation:
  :class:`DINOv2Segmenter` (``src/third_party/dino/dinov2.py`` ``UNetDecoder`` over the last five blocks);
  classification: :class:`DINOv2Classifier` (``ClassificationHead``: one linear layer over the class tokens of the
  last four blocks and the averaged patch tokens of the last).
* ``unet``: :class:`AuthorsUNet` (``src/third_party/unet.py``), trained from scratch.
* The ResNet18 row is timm's ``resnet18``, whose parameter names are torchvision's; ``pretrained: tv_in1k`` is
  torchvision's ``IMAGENET1K_V1`` (the authors' weights), and a torchvision weights file loads as well.

The converters (:func:`convert_authors_baseline` and one function per model class) turn the ``best_model.pth``
their scripts write with ``torch.save(<module>.state_dict(), ...)`` into the state dict of the usclip model, strictly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

#: ``dinov2:<arch>`` -> (timm model name, architecture overrides); ``test`` is a tiny random stand-in for tests
DINOV2_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "vits14": ("vit_small_patch14_dinov2", {}),
    "vitb14": ("vit_base_patch14_dinov2", {}),
    "vitl14": ("vit_large_patch14_dinov2", {}),
    "vitg14": ("vit_giant_patch14_dinov2", {}),
    "test": ("vit_base_patch14_dinov2", {"embed_dim": 32, "depth": 6, "num_heads": 2}),
}
#: blocks the authors' segmentation decoder reads (``n_last_blocks = 5``, later:src/models/dino/segmentation.py:72)
SEGMENTATION_BLOCKS = 5
#: blocks the authors' classifier reads (``n_last_blocks = 4``, later:src/models/dino/classification.py:78)
CLASSIFICATION_BLOCKS = 4


# ----------------------------------------------------------------------------------------------------------- DINOv2
def build_dinov2_backbone(arch: str, pretrained: str | None, image_size: int, layer_scale: bool = True) -> nn.Module:
    """A frozen DINOv2 ViT (timm ``VisionTransformer``) for ``image_size`` px, in eval mode.

    Args:
        arch: a key of :data:`DINOV2_ARCHS`.
        pretrained: ``None`` (random), a weights file (Facebook's release format, e.g.
            ``dinov2_vitb14_pretrain.pth`` with ``mask_token`` and a 37 x 37 position grid, or timm's format;
            converted by timm's ``checkpoint_filter_fn``, position embeddings resampled to the model's grid, then
            loaded strictly), ``"timm"`` (timm's default tag) or a timm tag such as ``lvd142m`` (downloaded).
        image_size: input side length, a multiple of the patch size (14).
        layer_scale: keep DINOv2's layer scale (``ls1``/``ls2``). ``False`` replaces both by the identity after the
            weights load, dropping the ``gamma`` values: what the authors' model does, which builds the ViT without
            ``init_values`` and loads the release file with ``strict=False`` (later:src/models/dino/segmentation.py:71,
            later:src/third_party/dino/layers/block.py:65 and :77, later:src/third_party/dino/dinov2.py:275).

    Raises:
        ValueError: for an unknown ``arch``, an ``image_size`` that is not a multiple of 14, or a tag for ``test``.
    """
    import timm

    from usclip.models.baselines import load_weights_file

    if arch not in DINOV2_ARCHS:
        raise ValueError(f"model_name='dinov2:<arch>' takes arch in {sorted(DINOV2_ARCHS)}, got arch={arch!r}")
    if image_size % 14:
        raise ValueError(f"DINOv2 has 14 px patches: image_size must be a multiple of 14 (e.g. 518), got {image_size}")
    name, overrides = DINOV2_ARCHS[arch]
    is_file = pretrained is not None and Path(pretrained).is_file()
    use_hub = pretrained is not None and not is_file
    if use_hub and overrides:
        raise ValueError(f"dinov2:{arch} is a random test architecture: pretrained must be null or a file")
    tagged = name if pretrained in (None, "timm") or is_file else f"{name}.{pretrained}"
    model = timm.create_model(tagged, pretrained=use_hub, img_size=image_size, num_classes=0, **overrides)
    if is_file:
        load_weights_file(model, str(pretrained))
    if not layer_scale:
        for block in model.blocks:  # type: ignore[union-attr]
            block.ls1, block.ls2 = nn.Identity(), nn.Identity()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class _FrozenBackboneMixin(nn.Module):
    """Keeps ``self.backbone`` in eval mode whatever ``train()`` is called with (their ``feature_model.eval()``)."""

    backbone: nn.Module

    def train(self, mode: bool = True) -> _FrozenBackboneMixin:
        """Set ``mode`` on every submodule but the backbone, which stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self


def _resize_in(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize to ``size`` x ``size`` when the input is another size (the pipeline always feeds ``size``)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


class DINOv2UpBlock(nn.Module):
    """One up-sampling step of the authors' decoder (``UNetDecoderUpBlock``, later:src/third_party/dino/dinov2.py:130).

    ``upconv`` doubles the running map; ``skip_conv`` (3x3 conv, BN, ReLU) brings a ViT block's ``(B, D, g, g)`` map to
    ``out_channels`` and is up-sampled bilinearly (``align_corners=True``) to the doubled map; ``conv`` (3x3 conv, BN,
    ReLU) fuses ``[up, skip]``.
    """

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.upconv = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = nn.Sequential(
            nn.Conv2d(2 * out_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.skip_conv = nn.Sequential(
            nn.Conv2d(embed_dim, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, s, s)`` and a block's ``(B, D, g, g)`` -> ``(B, C_out, 2s, 2s)``."""
        up = self.upconv(x)
        skip = F.interpolate(self.skip_conv(skip), size=up.shape[-2:], mode="bilinear", align_corners=True)
        return self.conv(torch.cat([up, skip], dim=1))


class DINOv2UNetDecoder(nn.Module):
    """The authors' decoder over the last five ViT blocks (``UNetDecoder``, later:src/third_party/dino/dinov2.py:154).

    The last block's map ``(B, D, g, g)`` goes through four :class:`DINOv2UpBlock` (``D -> D/2 -> D/4 -> D/8 ->
    num_classes`` channels, each doubling the grid: ``16 g``); the skips are blocks ``-2, -3, -4, -5`` in that order.
    The last up block ends in BatchNorm and ReLU like the others, so the logits are non-negative before the final
    resize: bicubic to ``image_size`` with antialiasing (their ``transforms.Resize(..., BICUBIC)`` on a tensor;
    ``16 g = 592 -> 518`` at 518 px).
    """

    def __init__(self, embed_dim: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        self.image_size = image_size
        dims = [embed_dim, embed_dim // 2, embed_dim // 4, embed_dim // 8, num_classes]
        self.up1 = DINOv2UpBlock(dims[0], dims[1], embed_dim)
        self.up2 = DINOv2UpBlock(dims[1], dims[2], embed_dim)
        self.up3 = DINOv2UpBlock(dims[2], dims[3], embed_dim)
        self.up4 = DINOv2UpBlock(dims[3], dims[4], embed_dim)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Logits ``(B, K, image_size, image_size)`` from the maps ``[(B, D, g, g)]`` of the last five blocks."""
        if len(feats) != SEGMENTATION_BLOCKS:
            raise ValueError(f"the decoder reads the last {SEGMENTATION_BLOCKS} blocks, got {len(feats)} maps")
        x = feats[4]
        for up, skip in zip(
            (self.up1, self.up2, self.up3, self.up4), (feats[3], feats[2], feats[1], feats[0]), strict=True
        ):
            x = up(x, skip)
        size = (self.image_size, self.image_size)
        return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)


class DINOv2Segmenter(_FrozenBackboneMixin):
    """Frozen DINOv2 under the authors' decoder (later:src/models/dino/segmentation.py:69-90).

    Args:
        backbone: from :func:`build_dinov2_backbone`.
        num_classes: output classes.
        image_size: the side the backbone was built for; other inputs are resized to it (bilinear).

    ``backbone.<name>`` is the authors' ``feature_model.encoder.<name>`` with ``blocks.0.<i>`` written ``blocks.<i>``
    (their chunked block list) and without ``mask_token`` (unused without masks); ``decoder.<name>`` is their saved
    ``decoders_dict.unet:lr=<lr>.<name>`` (:func:`convert_dinov2_segmentation`).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, image_size: int) -> None:
        super().__init__()
        if len(backbone.blocks) < SEGMENTATION_BLOCKS:  # type: ignore[arg-type]
            raise ValueError(f"the decoder reads the last {SEGMENTATION_BLOCKS} blocks; the backbone has fewer")
        self.backbone = backbone
        self.image_size = image_size
        self.decoder = DINOv2UNetDecoder(int(backbone.embed_dim), num_classes, image_size)  # type: ignore[arg-type]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K, H, W)`` for normalised images ``(B, 3, H, W)``."""
        h, w = images.shape[-2:]
        x = _resize_in(images, self.image_size)
        feats = self.backbone.forward_intermediates(  # type: ignore[operator]
            x, indices=SEGMENTATION_BLOCKS, norm=True, output_fmt="NCHW", intermediates_only=True
        )
        logits = self.decoder(list(feats))
        if logits.shape[-2:] != (h, w):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return logits


class DINOv2LinearHead(nn.Module):
    """The authors' classifier (their ``ClassificationHead``, later:src/third_party/dino/dinov2.py:33).

    ``linear`` over ``[cls_1, ..., cls_n, mean(patches_n)]``: the final-normed class tokens of the last ``n`` blocks,
    oldest first, then the mean of the last block's normed patch tokens (``(n + 1) D`` inputs). Weights start from
    N(0, 0.01), bias 0, as theirs. The authors allow ``n`` of 1 or 4 and run 4.
    """

    def __init__(self, embed_dim: int, num_classes: int, n_last_blocks: int = CLASSIFICATION_BLOCKS) -> None:
        super().__init__()
        self.n_last_blocks = n_last_blocks
        self.linear = nn.Linear((n_last_blocks + 1) * embed_dim, num_classes)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, feats: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Logits ``(B, K)`` from ``[(patch_tokens (B, L, D), prefix_tokens (B, 1, D))]`` of the last ``n`` blocks."""
        tokens = [prefix[:, 0] for _, prefix in feats] + [feats[-1][0].mean(dim=1)]
        return self.linear(torch.cat(tokens, dim=1))


class DINOv2Classifier(_FrozenBackboneMixin):
    """Frozen DINOv2 under the authors' linear classifier (later:src/models/dino/classification.py:69-94).

    Args:
        backbone: from :func:`build_dinov2_backbone`.
        num_classes: output classes.
        image_size: the side the backbone was built for; other inputs are resized to it (bilinear).
        n_last_blocks: blocks whose class tokens feed the classifier (the authors: 4).

    ``classifier.linear`` is their saved ``linear`` (:func:`convert_dinov2_classification`).
    """

    def __init__(
        self, backbone: nn.Module, num_classes: int, image_size: int, n_last_blocks: int = CLASSIFICATION_BLOCKS
    ) -> None:
        super().__init__()
        depth = len(backbone.blocks)  # type: ignore[arg-type]
        if not 1 <= n_last_blocks <= depth:
            raise ValueError(f"n_last_blocks must be in [1, {depth}] (the backbone's depth), got {n_last_blocks}")
        self.backbone = backbone
        self.image_size = image_size
        self.classifier = DINOv2LinearHead(int(backbone.embed_dim), num_classes, n_last_blocks)  # type: ignore[arg-type]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` for normalised images ``(B, 3, H, W)``."""
        x = _resize_in(images, self.image_size)
        feats = self.backbone.forward_intermediates(  # type: ignore[operator]
            x,
            indices=self.classifier.n_last_blocks,
            norm=True,
            return_prefix_tokens=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
        return self.classifier(list(feats))


def build_dinov2(
    task: str,
    arch: str,
    num_classes: int,
    pretrained: str | None,
    image_size: int,
    layer_scale: bool = True,
    n_last_blocks: int = CLASSIFICATION_BLOCKS,
) -> DINOv2Segmenter | DINOv2Classifier:
    """The authors' DINOv2 model for ``task`` (``model_name: dinov2:<arch>``, ``head: native``).

    Args:
        task: ``segmentation`` or ``classification``.
        arch: a key of :data:`DINOV2_ARCHS`.
        num_classes: output classes.
        pretrained: see :func:`build_dinov2_backbone`.
        image_size: input side length (the authors: 518).
        layer_scale: see :func:`build_dinov2_backbone` (the authors' model: ``False``).
        n_last_blocks: classification only: blocks whose class tokens are read (the authors: 4).

    Raises:
        ValueError: for ``n_last_blocks`` given to segmentation (the decoder reads five blocks).
    """
    backbone = build_dinov2_backbone(arch, pretrained, image_size, layer_scale)
    if task == "segmentation":
        if n_last_blocks != CLASSIFICATION_BLOCKS:
            raise ValueError(
                f"n_last_blocks is for classification; the segmentation decoder reads {SEGMENTATION_BLOCKS} blocks"
            )
        return DINOv2Segmenter(backbone, num_classes, image_size)
    return DINOv2Classifier(backbone, num_classes, image_size, n_last_blocks)


# ------------------------------------------------------------------------------------------------------------- UNet
class _ConvBlock(nn.Module):
    """Two 3x3 conv, BN, LeakyReLU(0.01) steps with dropout between them (their ``ConvBlock``)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.conv_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_conv(x)


class _DownBlock(nn.Module):
    """2x2 max pooling, then a :class:`_ConvBlock` (their ``DownBlock``)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), _ConvBlock(in_channels, out_channels, dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class _UpBlock(nn.Module):
    """2x2 transposed conv, concatenation ``[skip, up]``, a :class:`_ConvBlock` (their ``UpBlock``, bilinear off)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, skip_channels, kernel_size=2, stride=2)
        self.conv = _ConvBlock(2 * skip_channels, out_channels, 0.0)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class _UNetEncoder(nn.Module):
    def __init__(self, in_channels: int, chns: list[int], dropout: tuple[float, ...]) -> None:
        super().__init__()
        self.in_conv = _ConvBlock(in_channels, chns[0], dropout[0])
        self.down1 = _DownBlock(chns[0], chns[1], dropout[1])
        self.down2 = _DownBlock(chns[1], chns[2], dropout[2])
        self.down3 = _DownBlock(chns[2], chns[3], dropout[3])
        self.down4 = _DownBlock(chns[3], chns[4], dropout[4])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.in_conv(x)]
        for down in (self.down1, self.down2, self.down3, self.down4):
            feats.append(down(feats[-1]))
        return feats


class _UNetDecoder(nn.Module):
    def __init__(self, chns: list[int], num_classes: int) -> None:
        super().__init__()
        self.up1 = _UpBlock(chns[4], chns[3], chns[3])
        self.up2 = _UpBlock(chns[3], chns[2], chns[2])
        self.up3 = _UpBlock(chns[2], chns[1], chns[1])
        self.up4 = _UpBlock(chns[1], chns[0], chns[0])
        self.out_conv = nn.Conv2d(chns[0], num_classes, kernel_size=3, padding=1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[4]
        for up, skip in zip(
            (self.up1, self.up2, self.up3, self.up4), (feats[3], feats[2], feats[1], feats[0]), strict=True
        ):
            x = up(x, skip)
        return self.out_conv(x)


class AuthorsUNet(nn.Module):
    """The authors' 2D UNet (later:src/third_party/unet.py:119), trained from scratch, for ``model_name: unet``.

    Five levels of ``init_channels * (1, 2, 4, 8, 16)`` channels (16 to 256); each level two 3x3 conv, BatchNorm,
    LeakyReLU(0.01) steps with dropout 0.05, 0.1, 0.2, 0.3, 0.5 between them (encoder; none in the decoder); 2x2 max
    pooling down, 2x2 transposed convolutions up, skip first in each concatenation; a 3x3 output conv. 1.94 M parameters
    at 16 channels. The side of the input must be a multiple of 16.

    Written here because no library model is this network: MONAI's ``BasicUNet`` applies dropout after both convs of a
    level, orders norm-dropout-activation, takes one dropout rate and ends in a 1x1 conv; its ``UNet`` uses strided
    convolutions and residual units; segmentation-models-pytorch's ``Unet`` needs a pretrained-style encoder.
    Parameter names are the authors' (``encoder.in_conv.conv_conv.0.weight``, ``decoder.up1.up.weight``, ...), so
    their ``best_model.pth`` loads unchanged (:func:`convert_unet`).

    Args:
        in_channels: input channels (3: grey copied to RGB, as in the pipeline).
        num_classes: output classes.
        init_channels: channels of the first level (the authors: 16).
    """

    #: dropout per encoder level (their ``params["dropout"]``)
    DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)

    def __init__(self, in_channels: int = 3, num_classes: int = 2, init_channels: int = 16) -> None:
        super().__init__()
        if init_channels < 1:
            raise ValueError(f"init_channels must be a positive channel count, got {init_channels}")
        chns = [init_channels * 2**i for i in range(5)]
        self.encoder = _UNetEncoder(in_channels, chns, self.DROPOUT)
        self.decoder = _UNetDecoder(chns, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K, H, W)`` for images ``(B, C, H, W)`` with ``H`` and ``W`` multiples of 16."""
        if images.shape[-2] % 16 or images.shape[-1] % 16:
            raise ValueError(
                f"the UNet pools four times: image height and width must be multiples of 16, got {tuple(images.shape)}"
            )
        return self.decoder(self.encoder(images))


# ------------------------------------------------------------------------------------------------------- converters
def _strict_fill(
    mapped: Mapping[str, torch.Tensor], model: nn.Module, part: str, source: str
) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every key under ``part`` (``""``: all) taken from ``mapped``, checked strictly."""
    state = model.state_dict()
    own = {k for k in state if k.startswith(part)}
    missing, unexpected = sorted(own - set(mapped)), sorted(set(mapped) - own)
    if missing or unexpected:
        raise ValueError(
            f"the {source} state dict does not fit {type(model).__name__}: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for k, v in mapped.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise ValueError(
                f"the {source} state dict does not fit {type(model).__name__}: {k} has shape {tuple(v.shape)}, "
                f"the model {tuple(state[k].shape)}"
            )
    return {**state, **{k: v.detach().clone() for k, v in mapped.items()}}


def convert_dinov2_segmentation(state: Mapping[str, torch.Tensor], model: DINOv2Segmenter) -> dict[str, torch.Tensor]:
    """The authors' saved DINOv2 decoder as the state dict of ``model``.

    Their script saves ``torch.save(decoders.state_dict(), "best_model.pth")``
    (later:src/models/dino/segmentation.py:186): the decoder only, under ``decoders_dict.unet:lr=<lr>.`` (one
    decoder per learning rate; their scripts train one). Those keys become ``decoder.*``; the frozen backbone is
    ``model``'s own (load the release weights with ``pretrained``). Load the result with
    ``model.load_state_dict(..., strict=True)``.

    Raises:
        ValueError: for several decoders, or keys or shapes that do not fit ``model.decoder``.
    """
    prefixes = sorted({".".join(k.split(".")[:2]) for k in state if k.startswith("decoders_dict.")})
    if len(prefixes) != 1 or len(state) != sum(k.startswith(prefixes[0] + ".") for k in state):
        raise ValueError(
            "expected the authors' DINOv2 decoders.state_dict() with one decoder (keys "
            f"'decoders_dict.unet:lr=<lr>.*'), got decoders {prefixes} and keys {sorted(state)[:3]}"
        )
    mapped = {"decoder." + k.removeprefix(prefixes[0] + "."): v for k, v in state.items()}
    return _strict_fill(mapped, model, "decoder.", "authors' DINOv2 decoder")


def convert_dinov2_classification(
    state: Mapping[str, torch.Tensor], model: DINOv2Classifier
) -> dict[str, torch.Tensor]:
    """The authors' saved DINOv2 classifier as the state dict of ``model``.

    Their script saves ``torch.save(classifier.state_dict(), "best_model.pth")``
    (later:src/models/dino/classification.py:191): ``linear.weight`` and ``linear.bias``, which become
    ``classifier.linear.*``; the frozen backbone is ``model``'s own.

    Raises:
        ValueError: for keys or shapes that do not fit ``model.classifier`` (e.g. another ``n_last_blocks``).
    """
    mapped = {"classifier." + k: v for k, v in state.items()}
    return _strict_fill(mapped, model, "classifier.", "authors' DINOv2 classifier")


def convert_unet(state: Mapping[str, torch.Tensor], model: AuthorsUNet) -> dict[str, torch.Tensor]:
    """The authors' saved UNet: ``torch.save(model.state_dict(), ...)``, later:src/models/baselines/segmentation.py:154.

    The names are the same; every key and shape is checked (e.g. another ``init_channels`` fails).
    """
    return _strict_fill(dict(state), model, "", "authors' UNet")


def convert_resnet_classifier(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The authors' saved torchvision ResNet (fc replaced; later:src/models/baselines/classification.py:174) for timm.

    timm's ``ResNet`` names its parameters as torchvision does (``conv1``, ``bn1``, ``layer<i>.<j>.conv1``,
    ``downsample.0``/``.1``, ``fc``), so the keys map unchanged; every key and shape is checked.
    """
    return _strict_fill(dict(state), model, "", "authors' torchvision ResNet")


def convert_authors_baseline(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Convert a ``best_model.pth`` of the authors' baseline scripts into the state dict of the usclip ``model``.

    Args:
        state: ``torch.load(path, map_location="cpu", weights_only=True)`` of the authors' file.
        model: the native model of the equivalent usclip config (``task.net``): :class:`DINOv2Segmenter`
            (``configs/baselines/dinov2_authors.yaml`` after a segmentation config), :class:`DINOv2Classifier`
            (the same overlay after a classification config), :class:`AuthorsUNet` (``unet_authors.yaml``) or timm's
            ResNet (``resnet18_authors.yaml``).

    Returns:
        A state dict that ``model.load_state_dict(..., strict=True)`` takes.

    Raises:
        ValueError: for a model of another class, or a state dict that does not fit it.
    """
    converters: list[tuple[type[nn.Module], Callable[..., dict[str, torch.Tensor]]]] = [
        (DINOv2Segmenter, convert_dinov2_segmentation),
        (DINOv2Classifier, convert_dinov2_classification),
        (AuthorsUNet, convert_unet),
    ]
    for cls, fn in converters:
        if isinstance(model, cls):
            return fn(state, model)
    if type(model).__name__ == "ResNet":
        return convert_resnet_classifier(state, model)
    raise ValueError(
        f"no converter for {type(model).__name__}: expected DINOv2Segmenter, DINOv2Classifier, AuthorsUNet or timm's "
        "ResNet (the net of a head: native task built from configs/baselines/*_authors.yaml)"
    )


def native_options(model_name: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check ``native_kwargs`` against what ``model_name`` takes; return them as a dict.

    Raises:
        ValueError: naming the keys ``model_name`` does not take.
    """
    accepted: dict[str, tuple[str, ...]] = {"dinov2": ("layer_scale", "n_last_blocks"), "unet": ("init_channels",)}
    opts = dict(options or {})
    family = model_name.split(":", 1)[0]
    allowed = accepted.get(family, ())
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(
            f"native_kwargs {unknown} are not options of model_name={model_name!r} (it takes {list(allowed) or 'none'})"
        )
    return opts
