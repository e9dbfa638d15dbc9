"""CLIPSeg (Lüddecke and Ecker, "Image Segmentation Using Text and Image Prompts", CVPR 2022) as a native baseline.

The Hugging Face transformers implementation (``CLIPSegForImageSegmentation``, checkpoint
``CIDAS/clipseg-rd64-refined``) wrapped for the segmentation pipeline: normalised images ``(B, 3, H, W)`` in,
two-class logits ``(B, 2, H, W)`` out, for the same Dice + cross-entropy loss and metrics as every other run. The
CLIP image and text towers are frozen; the CLIPSeg decoder (FiLM-conditioned on the prompt's CLIP text embedding,
fed blocks 3/6/9 of the image tower) is trained, initialised from the checkpoint. This follows the authors of
arXiv:2506.08849 (``CLIPSegAdapter`` in their released code); docs/baselines.md states the protocol and every
difference.

Needs the optional extra ``usclip[clipseg]`` (transformers). The prompt is tokenised once with open_clip's bundled
CLIP BPE tokenizer (the same vocabulary and the same ids as OpenAI's ``clip.tokenize``, which the authors use), so
no tokenizer files or network are needed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

log = logging.getLogger(__name__)

#: the checkpoint of the paper's CLIPSeg rows
DEFAULT_CHECKPOINT = "CIDAS/clipseg-rd64-refined"
#: mean and std of CLIPSeg's own preprocessing (ImageNet), used when the checkpoint's processor file is not at hand
CLIPSEG_MEAN = (0.485, 0.456, 0.406)
CLIPSEG_STD = (0.229, 0.224, 0.225)

#: the authors' CLIPSeg prompt per organ (their ``src/models/clipseg/prompt.py``), one sentence pair each
ORGAN_PROMPTS: dict[str, str] = {
    "breast": (
        "Benign breast lesion: Oval shape, smooth margins, parallel orientation, homogeneous hypoechoic "
        "echotexture, posterior enhancement. Malignant breast lesion: Irregular shape, spiculated margins, "
        "non-parallel orientation, heterogeneous hypoechoic echotexture, microcalcifications, posterior shadowing."
    ),
    "thyroid": (
        "Benign thyroid nodule: oval, wider-than-tall, homogeneous, smooth margins, intact capsule. Malignant "
        "thyroid nodule: taller-than-wide, hypoechoic, irregular margins, microcalcifications, "
        "capsular/extra-thyroidal invasion."
    ),
    "lymph_node": (
        "Benign lymph node: Oval shape, preserved echogenic hilum, thin homogeneous cortex. Malignant lymph node: "
        "Round, lost hilum, thickened/heterogeneous cortex, microcalcifications, irregular margins."
    ),
    "prostate": (
        "Benign prostate: smooth, symmetric TZ enlargement with heterogeneous nodules and intact capsule; Malignant "
        "prostate: focal peripheral-zone hypoechoic lesion with irregular margins, capsular breach and increased "
        "Doppler flow."
    ),
}
#: ``text_prompt`` names: each dataset of the paper (as the configs name them) -> its organ's prompt
DATASET_PROMPTS: dict[str, str] = {
    "busi": "breast",
    "ddti": "thyroid",
    "tn3k": "thyroid",
    "ln1": "lymph_node",
    "ln2": "lymph_node",
    "prostate": "prostate",
}

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_INSTALL_HINT = "pip install 'usclip[clipseg]' (transformers>=4.40)"


def resolve_prompt(text_prompt: str | None) -> str:
    """The prompt text that ``text_prompt`` names.

    Args:
        text_prompt: a dataset name (``busi``, ``ddti``, ``tn3k``, ``ln1``, ``ln2``, ``prostate``: the authors' prompt
            for it), an organ name (``breast``, ``thyroid``, ``lymph_node``, ``prostate``) or free text (kept as is).

    Raises:
        ValueError: for ``None`` or an empty prompt.
    """
    if text_prompt is None or not text_prompt.strip():
        raise ValueError(
            f"CLIPSeg needs text_prompt: a dataset name ({', '.join(DATASET_PROMPTS)}), an organ name "
            f"({', '.join(ORGAN_PROMPTS)}) or your own sentence; got {text_prompt!r}. "
            "Set it with --model.init_args.text_prompt=busi (the authors' prompt for the dataset)"
        )
    key = text_prompt.strip().lower()
    organ = DATASET_PROMPTS.get(key, key)
    return ORGAN_PROMPTS.get(organ, text_prompt)


def tokenize_prompt(text: str, context_length: int) -> torch.Tensor:
    """Token ids ``(1, context_length)`` of ``text`` with CLIP's BPE (start, tokens, end, zero padding).

    Raises:
        ValueError: when the prompt needs more tokens than the text tower has positions (the authors' ``clip.tokenize``
            refuses such prompts too; nothing is cut silently).
    """
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    needed = len(tokenizer.encode(text)) + 2  # start and end tokens
    if needed > context_length:
        raise ValueError(
            f"text_prompt needs {needed} CLIP tokens but the CLIPSeg text tower takes {context_length}: shorten it "
            f"(got {text[:80]!r}...)"
        )
    return tokenizer([text], context_length=context_length)


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - the dev environment has transformers
        raise ImportError(f"model_name='clipseg:...' needs transformers: {_INSTALL_HINT}") from err
    return transformers


def _missing_weights_error(source: str, err: Exception) -> OSError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return OSError(
        f"cannot load CLIPSeg {source!r} ({first}). It is read from the Hugging Face cache ($HF_HOME/hub, by default "
        f"~/.cache/huggingface/hub) or downloaded when online. Get it on a machine with network with "
        f"`hf download {source}` (or `huggingface-cli download {source}`) and copy the cache, or download "
        f"https://huggingface.co/{source} into a folder (config.json, model.safetensors) and set "
        "model_name/pretrained to that folder (random weights: pretrained: null with a .json config)"
    )


def clipseg_config(source: str) -> CLIPSegConfig:
    """The CLIPSeg architecture named by ``source``.

    Args:
        source: a config shipped in ``usclip/models/model_configs`` (``usclip-test-clipseg``), a ``.json`` config
            file, a local checkpoint folder or a Hugging Face hub id (``CIDAS/clipseg-rd64-refined``).

    Raises:
        OSError: when a hub id is neither cached nor downloadable (the message says where to get it).
    """
    transformers = _import_transformers()
    shipped = _CONFIG_DIR / f"{source}.json"
    path = shipped if shipped.is_file() else Path(source)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"CLIPSeg config file {source!r} not found")
        return transformers.CLIPSegConfig.from_json_file(str(path))
    try:
        return transformers.CLIPSegConfig.from_pretrained(source)
    except OSError as err:
        raise _missing_weights_error(source, err) from err


def _processor_stats(source: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std from the checkpoint's ``preprocessor_config.json`` (a folder, or the hub cache), else ImageNet's."""
    path: Any = Path(source) / "preprocessor_config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            path = try_to_load_from_cache(source, "preprocessor_config.json")
        except Exception:  # not a hub id (e.g. a folder without the file)
            path = None
    if not isinstance(path, (str, Path)) or not Path(path).is_file():
        return CLIPSEG_MEAN, CLIPSEG_STD
    cfg = json.loads(Path(path).read_text())
    return tuple(cfg.get("image_mean", CLIPSEG_MEAN)), tuple(cfg.get("image_std", CLIPSEG_STD))


class CLIPSegNet(nn.Module):
    """A CLIPSeg model with a fixed text prompt: normalised images in, two-class logits at the input size out.

    The image is resized (bilinear) to ``input_size`` × ``input_size`` when it is not already that size, because
    transformers' CLIPSeg decoder reshapes its tokens to a square grid; the foreground logits (the decoder's
    transposed convolutions give ``input_size`` px for a multiple of the patch size) are resized back to ``(H, W)``
    (bilinear). At the checkpoint's own image size (224 px for ``CIDAS/clipseg-rd64-refined``, the pipeline's and the
    authors' size) the position embeddings are used as they are; at any other size transformers interpolates them
    (bicubic, its ``interpolate_pos_encoding``), as CLIPSeg's own 352 px processor relies on.

    The two channels are ``(-l, l)`` for the decoder's foreground logit ``l``, as in the authors' code, so softmax
    over them is ``sigmoid(2 l)``.

    Args:
        model: the transformers model; its ``clip`` part (image and text towers) is frozen here.
        text_prompt: a dataset or organ name of :data:`DATASET_PROMPTS` / :data:`ORGAN_PROMPTS`, or free text.
        input_size: side length the model sees.
    """

    def __init__(self, model: CLIPSegForImageSegmentation, text_prompt: str, input_size: int) -> None:
        super().__init__()
        self.model = model
        self.text = resolve_prompt(text_prompt)
        self.input_size = int(input_size)
        text_config: Any = model.config.text_config
        context = int(text_config.max_position_embeddings)
        ids = tokenize_prompt(self.text, context)
        vocab = int(text_config.vocab_size)
        if int(ids.max()) >= vocab:
            raise ValueError(
                f"the CLIPSeg text tower has vocab_size={vocab}, but CLIP's BPE needs 49408 token ids; use a config "
                "with CLIP's vocabulary"
            )
        # Not persistent: the prompt comes from the configuration (recorded in the run's config.yaml), not the
        # checkpoint, so a checkpoint holds the same keys as the transformers model.
        self.input_ids: torch.Tensor
        self.register_buffer("input_ids", ids, persistent=False)  # (1, context)
        for p in self.model.clip.parameters():
            p.requires_grad_(False)

    def prompt_embedding(self) -> torch.Tensor:
        """The prompt's CLIP text embedding ``(1, projection_dim)``, the decoder's conditioning (frozen)."""
        with torch.no_grad():
            return self.model.get_conditional_embeddings(batch_size=1, input_ids=self.input_ids)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 2, H, W)`` (background, lesion) for normalised images ``(B, 3, H, W)``."""
        b, _, h, w = images.shape
        s = self.input_size
        x = images if (h, w) == (s, s) else F.interpolate(images, size=(s, s), mode="bilinear", align_corners=False)
        cond = self.prompt_embedding().expand(b, -1)  # (1, P) -> (B, P)
        logits = self.model(pixel_values=x, conditional_embeddings=cond).logits
        fg = logits.reshape(b, 1, *logits.shape[-2:])  # (B, s, s); older transformers squeeze a batch of one fully
        if fg.shape[-2:] != (h, w):
            fg = F.interpolate(fg, size=(h, w), mode="bilinear", align_corners=False)
        return torch.cat([-fg, fg], dim=1)


def build_clipseg(
    source: str, pretrained: str | None, text_prompt: str | None, image_size: int
) -> tuple[CLIPSegNet, tuple[float, ...], tuple[float, ...]]:
    """A CLIPSeg model for ``model_name: clipseg:<source>`` with ``head: native``.

    Args:
        source: the architecture (see :func:`clipseg_config`); empty means ``CIDAS/clipseg-rd64-refined``.
        pretrained: ``None`` (random weights from the architecture's config), a local weights file (``.safetensors``
            or torch, loaded strictly), or a hub id / checkpoint folder for ``from_pretrained`` (cache and
            ``HF_HUB_OFFLINE`` aware), which then brings the architecture: ``source`` must be empty or the same.
        text_prompt: see :class:`CLIPSegNet`.
        image_size: the pipeline's image size, which the model is run at.

    Returns:
        ``(model, mean, std)``: the model and the normalisation of the checkpoint's processor (ImageNet's for CLIPSeg).

    Raises:
        ValueError: for a missing prompt, or ``source`` and ``pretrained`` naming different checkpoints.
        OSError: for weights that are neither cached nor downloadable (the message says where to get them).
    """
    from usclip.models.baselines import _is_file, load_weights_file

    transformers = _import_transformers()
    resolve_prompt(text_prompt)  # fail on a missing prompt before loading weights
    assert text_prompt is not None
    from_hub = pretrained is not None and not _is_file(pretrained)
    source = source or (pretrained if from_hub else None) or DEFAULT_CHECKPOINT
    shipped_or_json = (_CONFIG_DIR / f"{source}.json").is_file() or source.endswith(".json")
    if not from_hub:
        model = transformers.CLIPSegForImageSegmentation(clipseg_config(source))
        if pretrained is not None:
            load_weights_file(model, pretrained)
        else:
            log.warning("CLIPSeg %s with random weights (pretrained: null)", source)
        mean, std = _processor_stats(source) if not shipped_or_json else (CLIPSEG_MEAN, CLIPSEG_STD)
    else:
        assert pretrained is not None
        if source != pretrained:
            raise ValueError(
                f"model_name='clipseg:{source}' and pretrained={pretrained!r} name different CLIPSeg checkpoints: "
                "name the same hub id or folder in both"
            )
        try:
            model = transformers.CLIPSegForImageSegmentation.from_pretrained(pretrained)
        except OSError as err:
            raise _missing_weights_error(pretrained, err) from err
        mean, std = _processor_stats(pretrained)
    model.float()
    return CLIPSegNet(model, text_prompt, image_size), mean, std
