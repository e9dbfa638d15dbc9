"""Weights as users get them: open_clip tags and hf-hub ids resolved from a Hugging Face cache, offline.

A temporary cache (``HF_HUB_CACHE``/``HF_HOME`` pointed at it, ``HF_HUB_OFFLINE=1``) is filled with random-weight
files in huggingface_hub's own layout (``models--org--name/blobs/<sha256>``, ``snapshots/<rev>/<file>`` linking to
the blob, ``refs/main`` naming the revision), in the repositories and under the file names open_clip 3.3 asks for:

* ``ViT-B-16`` ``openai``: ``timm/vit_base_patch16_clip_224.openai``, ``open_clip_model.safetensors``;
* ``ViT-B-16-quickgelu`` ``metaclip_400m``: ``timm/vit_base_patch16_clip_224.metaclip_400m``, same file name;
* ``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``: ``open_clip_config.json`` and
  ``open_clip_pytorch_model.bin`` (no safetensors there, so open_clip's fallback runs), plus the text tower's
  ``config.json`` and ``vocab.txt`` in ``microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract``.

The real resolution code (open_clip's ``download_pretrained``, huggingface_hub's ``hf_hub_download``, transformers'
``AutoConfig``/``AutoTokenizer``) runs against it. The image towers are the real ViT-B/16 shapes, stored in fp16
like the published files; the BERT text tower is shrunk to 2 layers of width 32 with a 17-token vocabulary (its
files and names are the real ones) to keep the tests in seconds. Reference features come from open_clip's own tower
with the file's tensors loaded by ``load_state_dict(strict=True)``: no usclip loading code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
from huggingface_hub import constants as hf_constants
from open_clip.model import _build_vision_tower
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file
from torch import nn

import usclip.models.encoder as encoder_module
from usclip.models import CLIPEncoder, PretrainedWeightsError
from usclip.tasks import SegmentationTask

OPENAI_REPO = "timm/vit_base_patch16_clip_224.openai"
METACLIP_REPO = "timm/vit_base_patch16_clip_224.metaclip_400m"
BIOMEDCLIP_REPO = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BIOMEDCLIP = f"hf-hub:{BIOMEDCLIP_REPO}"
BERT_REPO = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
LAYERS = (0, 2)
VOCAB = ["[PAD]", "[unused0]", "[unused1]", "[unused2]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB += ["a", "hypo", "##echo", "##ic", "lesion", "breast", "benign", "malignant", "."]
#: BiomedCLIP's open_clip_config.json as published (model_cfg and preprocess_cfg)
BIOMEDCLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 512,
        "vision_cfg": {
            "timm_model_name": "vit_base_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": {
            "hf_model_name": BERT_REPO,
            "hf_tokenizer_name": BERT_REPO,
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 256,
        },
    },
    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
}
#: BERT-base's config.json keys, shrunk (2 layers, width 32, this file's vocabulary)
BERT_CONFIG = {
    "architectures": ["BertForMaskedLM"],
    "model_type": "bert",
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": len(VOCAB),
}


# ----------------------------------------------------------------------------------------------- the cache
@dataclass
class Cache:
    """A Hugging Face hub cache folder written the way huggingface_hub writes downloads."""

    root: Path

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / f"models--{repo_id.replace('/', '--')}"

    def revision(self, repo_id: str) -> str:
        return hashlib.sha1(repo_id.encode()).hexdigest()  # a 40-hex commit hash per repo

    def snapshot(self, repo_id: str) -> Path:
        return self.repo_dir(repo_id) / "snapshots" / self.revision(repo_id)

    def put(self, repo_id: str, filename: str, source: Path | bytes) -> Path:
        """Store one file as a blob named by its sha256, link it from the snapshot, point refs/main at it.

        A file ``source`` is moved into the blob store; one already there (named by its digest) stays.
        """
        repo, rev = self.repo_dir(repo_id), self.revision(repo_id)
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(rev)
        if isinstance(source, Path) and source.parent == repo / "blobs":
            name = source.name
        else:
            digest = hashlib.sha256()
            if isinstance(source, bytes):
                digest.update(source)
            else:
                with open(source, "rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
            name = digest.hexdigest()
        blob = repo / "blobs" / name
        if isinstance(source, bytes):
            blob.write_bytes(source)
        elif source.resolve() != blob.resolve():
            shutil.move(source, blob)
        link = self.snapshot(repo_id) / filename
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        return link


def _random_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random fp16 tensors for every key of ``model`` (built on the meta device: no initialisation cost).

    Drawing 150 M normal numbers takes seconds on a small CPU: the tensors are cut from a tiled pool of a prime
    number of draws instead, at shifting offsets, so no two rows or tensors are equal.
    """
    pool_size = 1_000_003
    pool = (torch.randn(pool_size, generator=torch.Generator().manual_seed(seed)) * 0.02).half()
    state, offset = {}, 0
    for key, ref in model.state_dict().items():
        n = ref.numel()
        start = offset % pool_size
        value = pool.repeat((start + n) // pool_size + 1)[start : start + n].view(ref.shape).clone()
        if ref.ndim == 1 and key.endswith("weight"):  # norm scales around 1, so features keep their size
            value += 1.0
        state[key] = value
        offset += n + 7919
    return state


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """An empty Hugging Face cache that huggingface_hub, open_clip and transformers read, offline."""
    home = tmp_path_factory.mktemp("hf_home")
    root = home / "hub"
    root.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_HUB_CACHE", str(root))
        mp.setenv("HF_HUB_OFFLINE", "1")
        # huggingface_hub reads the variables once, at import: its module constants are what the code consults
        mp.setattr(hf_constants, "HF_HOME", str(home))
        mp.setattr(hf_constants, "HF_HUB_CACHE", str(root))
        mp.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        yield Cache(root)


@pytest.fixture(scope="module")
def vitb16_file(cache: Cache, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """One random CLIP ViT-B/16 state dict, stored as the OpenAI and the MetaCLIP repos' safetensors file."""
    with torch.device("meta"):
        model = open_clip.model.CLIP(**open_clip.get_model_config("ViT-B-16"))
    state = _random_state(model, seed=0)
    path = tmp_path_factory.mktemp("w") / "open_clip_model.safetensors"
    save_file(state, path)
    first = cache.put(OPENAI_REPO, "open_clip_model.safetensors", path)
    second = cache.repo_dir(METACLIP_REPO) / "blobs" / first.resolve().name
    second.parent.mkdir(parents=True)
    os.link(first.resolve(), second)  # the same bytes in the other repo's blob store, without a second copy
    cache.put(METACLIP_REPO, "open_clip_model.safetensors", second)
    return state


@pytest.fixture(scope="module")
def biomedclip_file(cache: Cache) -> dict[str, torch.Tensor]:
    """BiomedCLIP's repo (config and a random-weight .bin) and its text tower's config and vocabulary."""
    # BiomedCLIP's text tower is a transformers model (open_clip's HFTextEncoder): the dev extra installs it; the
    # lowest-versions run (.ci/run) leaves it out and these tests skip there with this reason
    pytest.importorskip("transformers", reason="BiomedCLIP's text tower needs transformers (usclip[llm])")
    cache.put(BERT_REPO, "config.json", json.dumps(BERT_CONFIG).encode())
    cache.put(BERT_REPO, "vocab.txt", ("\n".join(VOCAB) + "\n").encode())
    cache.put(BIOMEDCLIP_REPO, "open_clip_config.json", json.dumps(BIOMEDCLIP_CONFIG).encode())
    cfg = BIOMEDCLIP_CONFIG["model_cfg"]
    with torch.device("meta"):  # the BERT from its config.json, not from weights (hf_model_pretrained off)
        model = open_clip.model.CustomTextCLIP(**{**cfg, "text_cfg": {**cfg["text_cfg"], "hf_model_pretrained": False}})
    state = _random_state(model, seed=1)
    buf = io.BytesIO()
    torch.save(state, buf)
    cache.put(BIOMEDCLIP_REPO, "open_clip_pytorch_model.bin", buf.getvalue())
    return state


def _images(n: int = 1, size: int = 224) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


def _reference_features(
    model_cfg: dict[str, Any], state: dict[str, torch.Tensor], quick_gelu: bool, images: torch.Tensor
) -> list[torch.Tensor]:
    """Patch features from open_clip's own tower holding the file's tensors (``load_state_dict(strict=True)``)."""
    with torch.device("meta"):
        tower = _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"], quick_gelu=quick_gelu)
    tower.to_empty(device="cpu")
    tower.load_state_dict({k[len("visual.") :]: v.float() for k, v in state.items() if k.startswith("visual.")})
    with torch.no_grad():
        out = tower.eval().forward_intermediates(
            images, indices=list(LAYERS), stop_early=True, intermediates_only=True, output_fmt="NCHW"
        )
    return list(out["image_intermediates"])


def _assert_loaded_from(enc: CLIPEncoder, state: dict[str, torch.Tensor]) -> None:
    """Every tensor of the (pruned) tower is the file's, converted to float32: nothing kept its random init."""
    own = enc.visual.state_dict()
    assert own, "empty tower"
    for key, value in own.items():
        torch.testing.assert_close(value, state[f"visual.{key}"].float(), rtol=0, atol=0, msg=key)


def _assert_features(enc: CLIPEncoder, reference: list[torch.Tensor], images: torch.Tensor) -> None:
    with torch.no_grad():
        feats = enc.eval()(images)
    assert [f.shape for f in feats] == [r.shape for r in reference]
    for a, b in zip(feats, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # batch-first attention sums in another order


# ----------------------------------------------------------------------------------------------- open_clip tags
TAGS = [("ViT-B-16", "openai", OPENAI_REPO), ("ViT-B-16-quickgelu", "metaclip_400m", METACLIP_REPO)]


@pytest.mark.parametrize(("model_name", "tag", "repo"), TAGS)
def test_tag_resolves_to_its_repo_and_file(cache: Cache, vitb16_file, model_name: str, tag: str, repo: str):
    _, weights, quick_gelu, preprocess = encoder_module._resolve(model_name, tag, False)
    assert Path(weights) == cache.snapshot(repo) / "open_clip_model.safetensors"  # this repo's file, not another
    assert Path(weights).resolve().parent == cache.repo_dir(repo) / "blobs"
    assert quick_gelu is True and preprocess["mean"] == open_clip.OPENAI_DATASET_MEAN


@pytest.mark.parametrize(("model_name", "tag", "repo"), TAGS)
def test_tag_resolves_to_the_cached_file_loads_strictly_and_gives_its_features(
    cache: Cache, vitb16_file: dict[str, torch.Tensor], model_name: str, tag: str, repo: str
):
    enc = CLIPEncoder(model_name, pretrained=tag, layers=LAYERS)
    assert isinstance(enc.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    _assert_loaded_from(enc, vitb16_file)
    images = _images()
    reference = _reference_features(open_clip.get_model_config("ViT-B-16"), vitb16_file, True, images)
    _assert_features(enc, reference, images)


def test_file_names_and_repos_open_clip_asks_for():
    """The layout the fixtures write is open_clip 3.3's: guard against a silent change of repo or file name."""
    for name, tag, repo in TAGS:
        assert open_clip.get_pretrained_cfg(name, tag)["hf_hub"] == f"{repo}/"
    assert open_clip.get_pretrained_cfg("ViT-B-16", "metaclip_fullcc")["hf_hub"].startswith("timm/")
    assert open_clip.constants.HF_SAFE_WEIGHTS_NAME == "open_clip_model.safetensors"
    assert open_clip.constants.HF_WEIGHTS_NAME == "open_clip_pytorch_model.bin"
    assert open_clip.constants.HF_CONFIG_NAME == "open_clip_config.json"


def test_a_tag_missing_from_the_cache_says_which_repo_file_and_cache(cache: Cache, vitb16_file):
    with pytest.raises(PretrainedWeightsError) as err:
        CLIPEncoder("ViT-B-16", pretrained="metaclip_fullcc", layers=LAYERS)  # not in the cache
    msg = str(err.value)
    assert "could not fetch the 'ViT-B-16' 'metaclip_fullcc' weights" in msg
    assert "'timm/vit_base_patch16_clip_224.metaclip_2pt5b'" in msg and "open_clip_model.safetensors" in msg
    assert "HF_HUB_OFFLINE is set" in msg and str(cache.root) in msg
    assert "hf download timm/vit_base_patch16_clip_224.metaclip_2pt5b" in msg and "local weights file" in msg
    assert msg.count("\n") <= 1, "one message, not a traceback's worth"


def test_a_cached_file_that_does_not_fit_names_the_keys(cache: Cache, tmp_path: Path):
    path = tmp_path / "open_clip_model.safetensors"  # another architecture's file under a ViT-B-16 tag
    save_file({"visual.ln_post.weight": torch.ones(512), "visual.extra": torch.zeros(1)}, path)
    repo = "timm/vit_base_patch16_clip_224.laion400m_e32"  # the ViT-B-16 tag laion400m_e32 reads this repo
    cache.put(repo, "open_clip_model.safetensors", path)
    with pytest.raises(PretrainedWeightsError) as err:
        CLIPEncoder("ViT-B-16", pretrained="laion400m_e32", layers=LAYERS)
    msg = str(err.value)
    assert "pretrained='laion400m_e32' does not fit the visual tower" in msg
    assert "151 missing keys ['class_embedding', 'positional_embedding', 'proj']" in msg
    assert "1 unexpected keys ['extra']" in msg and "1 shape mismatches ['ln_post.weight (512,) vs (768,)']" in msg


# ----------------------------------------------------------------------------------------------- hf-hub ids
def test_hf_hub_id_resolves_config_and_bin_and_gives_its_features(cache: Cache, biomedclip_file):
    model_cfg, weights, quick_gelu, preprocess = encoder_module._resolve(BIOMEDCLIP, BIOMEDCLIP, False)
    assert Path(weights) == cache.snapshot(BIOMEDCLIP_REPO) / "open_clip_pytorch_model.bin"  # safetensors absent
    assert model_cfg == BIOMEDCLIP_CONFIG["model_cfg"] and quick_gelu is False
    assert preprocess["mean"] == BIOMEDCLIP_CONFIG["preprocess_cfg"]["mean"]

    enc = CLIPEncoder(BIOMEDCLIP, pretrained=BIOMEDCLIP, layers=LAYERS)
    assert type(enc.visual.trunk.blocks[0].mlp.act) is nn.GELU  # BiomedCLIP's timm ViT: GELU, not QuickGELU
    assert len(enc.visual.trunk.blocks) == LAYERS[-1] + 1
    _assert_loaded_from(enc, biomedclip_file)
    assert enc.image_mean == tuple(BIOMEDCLIP_CONFIG["preprocess_cfg"]["mean"])
    images = _images()
    _assert_features(enc, _reference_features(model_cfg, biomedclip_file, False, images), images)


def test_hf_hub_tokenizer_files_come_from_the_cache(cache: Cache, biomedclip_file):
    tokens = open_clip.get_tokenizer(BIOMEDCLIP)(["a hypoechoic breast lesion."])
    assert tokens.shape == (1, 256)  # BiomedCLIP's context length, from open_clip_config.json
    assert tokens[0, :10].tolist() == [5, 8, 9, 10, 11, 13, 12, 16, 6, 0]  # [CLS] a hypo ##echo ##ic ... [SEP] [PAD]


def test_hf_hub_whole_model_loads_strictly_with_its_text_tower(cache: Cache, biomedclip_file):
    """keep_text builds BiomedCLIP with its BERT from the cached config and loads every tensor."""
    enc = CLIPEncoder(BIOMEDCLIP, pretrained=BIOMEDCLIP, layers=LAYERS, keep_text=True).eval()
    for key, value in enc.text_model.state_dict().items():
        torch.testing.assert_close(value, biomedclip_file[key].float(), rtol=0, atol=0, msg=key)
    tokens = enc.tokenizer()(["a benign lesion.", "a malignant lesion."])
    with torch.no_grad():
        text = enc.encode_text(tokens)
    assert text.shape == (2, 512) and torch.isfinite(text).all() and not torch.allclose(text[0], text[1])


def test_hf_hub_id_missing_from_the_cache_says_what_to_fetch(cache: Cache):
    with pytest.raises(PretrainedWeightsError) as err:
        CLIPEncoder("hf-hub:org/not-cached", pretrained="hf-hub:org/not-cached", layers=LAYERS)
    msg = str(err.value)
    assert "could not fetch 'hf-hub:org/not-cached'" in msg and "'org/not-cached'" in msg
    assert "open_clip_config.json" in msg and "HF_HUB_OFFLINE is set" in msg and str(cache.root) in msg


def test_hf_hub_model_name_with_a_local_file(cache: Cache, biomedclip_file, tmp_path: Path):
    """The architecture from the Hub config, the weights from a file (e.g. a fine-tuned BiomedCLIP)."""
    path = tmp_path / "biomedclip.safetensors"
    save_file(biomedclip_file, path)
    _, weights, _, _ = encoder_module._resolve(BIOMEDCLIP, str(path), False)
    assert weights == str(path)
    with pytest.raises(ValueError, match="two different Hub models"):
        encoder_module._resolve("hf-hub:org/other", BIOMEDCLIP, False)


# ----------------------------------------------------------------------------------------------- required weights
def test_task_without_pretrained_refuses_to_train_a_random_encoder():
    with pytest.raises(ValueError, match=r"pretrained is required.*null for random weights"):
        SegmentationTask(model_name="usclip-test-vit", layers=[1], image_size=64)
    task = SegmentationTask(model_name="usclip-test-vit", pretrained=None, layers=[1], image_size=64)
    assert task.hparams["pretrained"] is None


@pytest.mark.parametrize("model_name", ["usclip-test-vit", "timm:test_vit", "smp:Unet/resnet18"])
def test_task_with_a_missing_weights_file_names_path_and_format(model_name: str, tmp_path: Path):
    missing = tmp_path / "weights" / "vit.safetensors"
    head = "native" if model_name.startswith("smp:") else "paper"
    with pytest.raises(PretrainedWeightsError) as err:
        SegmentationTask(model_name=model_name, pretrained=str(missing), head=head, layers=[1], image_size=64)
    msg = str(err.value)
    assert f"pretrained={str(missing)!r} does not exist" in msg and str(missing) in msg
    assert ".safetensors" in msg and "state dict" in msg and "pretrained: null" in msg
