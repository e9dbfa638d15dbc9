"""The authors' heads (``head: authors_release | authors_src | authors_timm``) and their checkpoint converter.

Each head is compared with a re-implementation, in this file, of the authors' ``forward`` over the token
activations (release:models/openai/clip_adapter.py:90-130, later:src/third_party/openai_clip/clip_adapter.py:92-136,
later:src/third_party/timm/clip_adapter.py:118-160), with their modules built as their ``__init__`` builds them and
the same random weights. Three tapped levels with different weights and activation scales: a wrong pairing of levels
and modules changes the output.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from usclip.models.authors import convert_authors_state_dict, load_authors_checkpoint
from usclip.models.authors_heads import AUTHORS_HEADS, AuthorsHead
from usclip.models.baselines import TimmEncoder
from usclip.tasks import ClassificationTask, SegmentationTask

WIDTH, DIM, CLASSES, IMG, GRID = 12, 8, 3, 16, 4  # token width, reduce_dim, classes, image side, patch grid side
TASKS = ("segmentation", "classification")
CASES = [(v, t) for v in AUTHORS_HEADS for t in TASKS]
TINY = {"model_name": "usclip-test-vit", "pretrained": None, "layers": [1, 2, 3], "image_size": 64, "embed_dim": DIM}


# ----------------------------------------------------------------------------------------------- their code
def their_modules(version: str, width: int = WIDTH, levels: int = 3, img: int = IMG) -> nn.Module:
    """Their adapter's head modules, as their ``__init__`` builds them, with random weights (LayerNorms included)."""
    m = nn.Module()
    m.reduces = nn.ModuleList([nn.Linear(width, DIM) for _ in range(levels)])
    m.blocks = nn.ModuleList(
        [nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, DIM), nn.GELU(), nn.Linear(DIM, DIM)) for _ in range(levels)]
    )
    m.seg_head = nn.Sequential(
        nn.Upsample((img, img), mode="bilinear", align_corners=False), nn.Conv2d(DIM, CLASSES, 1)
    )
    if version == "authors_release":
        up = nn.Upsample((img, img), mode="bilinear", align_corners=False)
        m.cls_head = nn.Sequential(up, nn.Conv2d(DIM, CLASSES, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    elif version == "authors_src":
        m.cls_head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(DIM, DIM),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(DIM, CLASSES),
        )
    else:
        m.cls_head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(DIM, CLASSES))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m.eval()


def their_forward(m: nn.Module, version: str, task: str, activations: list[torch.Tensor]) -> torch.Tensor:
    """Their ``forward`` after ``extract_vit_features``: ``activations`` are ``(B, 1 + N, C)``, shallow to deep."""
    acts = activations[::-1]  # deep to shallow
    a = None
    if version == "authors_release":  # zip(reversed activations, blocks, reduces): block 0 on the deepest
        for act, block, reduce in zip(acts, m.blocks, m.reduces, strict=True):
            r = reduce(act[:, 1:, :])
            a = block(r if a is None else r + a)
    else:  # zip(reversed activations, reversed reduces, reversed blocks), each level through its block, summed
        for act, reduce, block in zip(acts, m.reduces[::-1], m.blocks[::-1], strict=True):
            r = block(reduce(act[:, 1:, :]))
            a = r if a is None else r + a
    size = int(math.sqrt(a.shape[1]))
    a = a.permute(0, 2, 1).reshape(a.shape[0], DIM, size, size)
    return m.seg_head(a) if task == "segmentation" else m.cls_head(a)


def their_parts(m: nn.Module, task: str) -> dict[str, dict[str, torch.Tensor]]:
    """The head parts of their checkpoint (release:clip_seg.py:182-186)."""
    head = "seg_head" if task == "segmentation" else "cls_head"
    return {"reduces": m.reduces.state_dict(), "blocks": m.blocks.state_dict(), head: getattr(m, head).state_dict()}


def flat(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v for part, sd in parts.items() for k, v in sd.items()}


def tokens(b: int = 2, levels: int = 3, grid: int = GRID, width: int = WIDTH) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(b, 1 + grid * grid, width, generator=g) * (k + 1) for k in range(levels)]  # scale per level


def maps(acts: list[torch.Tensor]) -> list[torch.Tensor]:
    """usclip's encoder output for these activations: class token removed, ``(B, C, h, w)``."""
    return [a[:, 1:, :].transpose(1, 2).reshape(a.shape[0], a.shape[2], GRID, GRID) for a in acts]


def their_visual_activations(visual: nn.Module, images: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
    """Their ``extract_vit_features`` (release:models/openai/clip_adapter.py:58-88) on an open_clip tower."""
    x = visual.conv1(images).flatten(2).permute(0, 2, 1)  # (B, C, gh, gw) -> (B, N, C)
    cls = visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype))
    out = []
    for i, block in enumerate(visual.transformer.resblocks):  # usclip's towers are batch-first
        x = block(x)
        if i in layers:
            out.append(x.clone())
    return out


# ----------------------------------------------------------------------------------------------- heads
@pytest.mark.parametrize(("version", "task"), CASES)
def test_head_equals_the_authors_forward(version, task):
    """Catches: the release's cascade paired shallow-first, the later sum paired deep-first, the block before the
    addition, up-sampling before pooling dropped, tokens reshaped column-major, the wrong classification head."""
    theirs = their_modules(version)
    ours = AuthorsHead([WIDTH] * 3, CLASSES, DIM, version=version, task=task).eval()
    ours.load_state_dict(flat(their_parts(theirs, task)), strict=True)
    acts = tokens()
    with torch.no_grad():
        expected = their_forward(theirs, version, task, acts)
        got = ours(maps(acts), size=(IMG, IMG))
    assert got.shape == expected.shape == ((2, CLASSES, IMG, IMG) if task == "segmentation" else (2, CLASSES))
    assert (got - expected).abs().max() <= 1e-5
    if task == "segmentation":  # the same weights under the other fusion give another output
        other = "authors_src" if version == "authors_release" else "authors_release"
        twin = AuthorsHead([WIDTH] * 3, CLASSES, DIM, version=other, task=task).eval()
        twin.load_state_dict(flat(their_parts(theirs, task)))
        with torch.no_grad():
            assert (twin(maps(acts), size=(IMG, IMG)) - expected).abs().max() > 1e-2


@pytest.mark.parametrize(("version", "task"), CASES)
def test_state_dict_keys_and_shapes_are_the_authors(version, task):
    ours = AuthorsHead([WIDTH] * 3, CLASSES, DIM, version=version, task=task)
    theirs = flat(their_parts(their_modules(version), task))
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    named = {
        "authors_release": "cls_head.1.weight",
        "authors_src": "cls_head.5.weight",
        "authors_timm": "cls_head.3.weight",
    }
    assert ("seg_head.1.weight" if task == "segmentation" else named[version]) in theirs


def test_release_pairs_widths_deepest_first():
    """Levels of different widths: the release's ``reduces[0]`` reads the deepest map, the later code's the first."""
    feats = [torch.randn(1, c, 2, 2) for c in (4, 6, 10)]
    release = AuthorsHead([4, 6, 10], 2, DIM, version="authors_release")
    src = AuthorsHead([4, 6, 10], 2, DIM, version="authors_src")
    assert [r.in_features for r in release.reduces] == [10, 6, 4] and [r.in_features for r in src.reduces] == [4, 6, 10]
    assert release(feats, size=(8, 8)).shape == src(feats, size=(8, 8)).shape == (1, 2, 8, 8)


def test_bad_head_arguments_are_named():
    with pytest.raises(ValueError, match="version must be one of"):
        AuthorsHead([4], version="authors_2024")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected 3 feature maps, got 2"):
        AuthorsHead([4, 4, 4])([torch.zeros(1, 4, 2, 2)] * 2, size=(4, 4))
    with pytest.raises(ValueError, match=r"head must be one of .*'authors_release'.*got 'authors'"):
        SegmentationTask(**TINY, head="authors")


# ----------------------------------------------------------------------------------------------- encoder features
def test_encoder_features_are_the_authors_tapped_activations():
    """The residual stream after blocks 1 and 3 (0-based), class token removed, no norm: their ``activation[:, 1:]``.

    Catches: features taken after ``ln_post`` or with the class token, blocks counted from 1."""
    from usclip.models import CLIPEncoder

    torch.manual_seed(0)
    enc = CLIPEncoder("usclip-test-vit", layers=(1, 3)).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        theirs = their_visual_activations(enc.visual, images, [1, 3])
        ours = enc(images)
    for a, f in zip(theirs, ours, strict=True):
        torch.testing.assert_close(f.flatten(2).transpose(1, 2), a[:, 1:, :], rtol=1e-5, atol=2e-5)


def _their_trunk_activations(vit: nn.Module, images: torch.Tensor, layers: tuple[int, ...]) -> list[torch.Tensor]:
    """Their ``TimmCLIPAdapter.extract_vit_features`` on a timm trunk (timm/clip_adapter.py:78-107), class token cut."""
    x = vit.patch_embed(images)
    x = x.flatten(1, 2) if x.ndim == 4 else x  # timm's test_vit keeps (B, gh, gw, C); BiomedCLIP's trunk is flat
    x = vit.pos_drop(torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + vit.pos_embed)
    out = []
    for i, block in enumerate(vit.blocks):
        x = block(x)
        if i in layers:
            out.append(x[:, 1:, :])
    return out


def test_clip_encoder_timm_trunk_features_are_the_authors_activations(tmp_path):
    """The BiomedCLIP path (an open_clip tower with a timm trunk, CLIPEncoder) under ``authors_timm``."""
    import json

    import open_clip

    from usclip.models import CLIPEncoder

    name = "usclip-test-authors-timm-vit"
    vision = {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "", "timm_proj": "linear"}
    text = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
    (tmp_path / f"{name}.json").write_text(json.dumps({"embed_dim": 32, "vision_cfg": vision, "text_cfg": text}))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(0)
    enc = CLIPEncoder(name, layers=(0, 1), image_size=64).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        theirs = _their_trunk_activations(enc.visual.trunk, images, (0, 1))
        ours = enc(images)
    for a, f in zip(theirs, ours, strict=True):
        torch.testing.assert_close(f.flatten(2).transpose(1, 2), a, rtol=1e-5, atol=1e-5)


def test_timm_encoder_features_are_the_authors_trunk_activations():
    """The DINOv2 path (``timm:`` backbones, TimmEncoder): the same activations."""
    torch.manual_seed(0)
    enc = TimmEncoder("test_vit", layers=(0, 1), image_size=64).eval()
    vit = enc.model
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        theirs = _their_trunk_activations(vit, images, (0, 1))
        ours = enc(images)
    for a, f in zip(theirs, ours, strict=True):
        torch.testing.assert_close(f.flatten(2).transpose(1, 2), a, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- tasks
@pytest.mark.parametrize(("version", "task"), CASES)
def test_task_trains_every_head_parameter(version, task):
    task_class = SegmentationTask if task == "segmentation" else ClassificationTask
    model = task_class(**TINY, head=version, num_classes=CLASSES).train()
    assert isinstance(model.head, AuthorsHead) and model.head.version == version and model.head.task == task
    images = torch.rand(2, 3, 64, 64)
    target = torch.randint(0, CLASSES, (2, 64, 64) if task == "segmentation" else (2,))
    before = {n: p.detach().clone() for n, p in model.head.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model._loss(model(images), target).backward()
    no_grad = [n for n, p in model.head.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in model.head.named_parameters())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"head.{n}" for n in before}


@pytest.mark.slow
def test_cli_fits_with_an_authors_head(tmp_path):
    """``--model.init_args.head authors_release`` through the real CLI, one fast_dev_run step (slow: 4 s; the fast
    twin is ``test_configs.py::test_overlay_config_instantiates[heads/*]``, which builds the task through the CLI)."""
    from usclip.cli import main

    from .test_cli import CONF_DIR, _args

    args = [*_args(CONF_DIR / "segmentation_none.yaml", tmp_path), "--trainer.fast_dev_run=true"]
    cli = main(["fit", *args, "--model.init_args.head", "authors_release"])
    assert isinstance(cli.model.head, AuthorsHead) and cli.model.head.version == "authors_release"
    assert cli.model.hparams["head"] == "authors_release"


# ----------------------------------------------------------------------------------------------- converter
def _mona_tensors(prefix: str, blocks: range) -> dict[str, torch.Tensor]:
    names = {"project1.weight": (64, 64), "adapter_conv.conv1.weight": (64, 1, 3, 3), "gamma": (64,)}
    return {f"{prefix}.{i}.mona.{n}": torch.full(s, float(i)) for i in blocks for n, s in names.items()}


def test_convert_renames_head_parts_and_mona_keys():
    m = their_modules("authors_release")
    saved = their_parts(m, "segmentation")
    saved["mona"] = {
        **_mona_tensors("clip_model.visual.transformer.resblocks", range(12)),
        **_mona_tensors("clip_model.transformer.resblocks", range(12)),  # the text tower's: never applied
    }
    out = convert_authors_state_dict(saved)
    assert out["head.reduces.2.weight"] is saved["reduces"]["2.weight"]
    assert out["head.blocks.1.3.bias"] is saved["blocks"]["1.3.bias"]
    assert out["head.seg_head.1.weight"] is saved["seg_head"]["1.weight"]
    key = "encoder.visual.transformer.resblocks.7.mona.adapter_conv.conv1.weight"
    assert torch.equal(out[key], torch.full((64, 1, 3, 3), 7.0))
    assert len([k for k in out if ".mona." in k]) == 12 * 3  # vision only
    assert len(out) == len(flat(their_parts(m, "segmentation"))) + 36
    # the later code's open_clip wrapper (MetaCLIP) and timm trunk (BiomedCLIP), to a chosen prefix and attribute
    later = {**their_parts(m, "segmentation"), "mona": {"clip_model.visual.trunk.blocks.4.mona.clip_mona.gamma": 0}}
    later["mona"]["clip_model.visual.trunk.blocks.4.mona.clip_mona.gamma"] = torch.ones(64)
    out = convert_authors_state_dict(later, blocks_prefix="encoder.visual.trunk.blocks.", mona_attr="mona_mlp")
    assert torch.equal(out["encoder.visual.trunk.blocks.4.mona_mlp.gamma"], torch.ones(64))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.update(optimizer={}), r"unknown top-level keys \['optimizer'\]"),
        (lambda s: s.pop("reduces"), r"missing \['reduces'\]"),
        (lambda s: s.update(cls_head={}), r"task heads present \['seg_head', 'cls_head'\]"),
        (lambda s: s.update(mona={"clip_model.visual.lora_A": torch.ones(1)}), r"'clip_model.visual.lora_A'"),
        (lambda s: s["blocks"].update({"0.1.weight": [1.0]}), r"saved\['blocks'\]\['0.1.weight'\] must be a tensor"),
    ],
)
def test_convert_names_what_is_wrong(change, message):
    saved = their_parts(their_modules("authors_src"), "segmentation")
    change(saved)
    with pytest.raises(ValueError, match=message):
        convert_authors_state_dict(saved)


@pytest.mark.parametrize(("version", "task"), [("authors_release", "classification"), ("authors_src", "segmentation")])
def test_round_trip_their_checkpoint_into_a_task(version, task, tmp_path):
    """Their checkpoint (their names, random tensors) -> file -> task: the task's logits equal their forward over
    their tapped activations of the same encoder. Catches: a renamed or dropped head tensor, a lax load."""
    task_class = SegmentationTask if task == "segmentation" else ClassificationTask
    model = task_class(**TINY, head=version, num_classes=CLASSES, normalization="none").eval()
    theirs = their_modules(version, width=64, img=64)  # usclip-test-vit: width 64, 64 px images
    saved = {**their_parts(theirs, task), "mona": _mona_tensors("clip_model.transformer.resblocks", range(2))}
    path = tmp_path / "adapter_components.pth"
    torch.save(saved, path)
    loaded = load_authors_checkpoint(model, path)
    assert len(loaded) == len(flat(their_parts(theirs, task)))
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = their_forward(
            theirs, version, task, their_visual_activations(model.encoder.visual, images, [1, 2, 3])
        )
        got = model(images)
    assert (got - expected).abs().max() <= 1e-5


def test_load_maps_mona_to_the_tasks_module_and_drops_pruned_blocks(tmp_path):
    """A task with Mona after the MLP (``mona_mlp``) and blocks 0-2 only (layers up to 2): their Mona of blocks
    0-2 lands there, blocks 3-11 (not built) are dropped; their checkpoint without Mona does not fit."""
    model = SegmentationTask(**{**TINY, "layers": [0, 1, 2]}, head="authors_timm", adapter="mona", num_classes=CLASSES)
    theirs = their_modules("authors_timm", width=64, img=64)
    mona = _mona_tensors("clip_model.visual.transformer.resblocks", range(12))
    for i in range(3):  # every other tensor of the task's Mona modules, under their names
        for n, p in model.encoder.visual.transformer.resblocks[i].mona_mlp.named_parameters():
            mona.setdefault(f"clip_model.visual.transformer.resblocks.{i}.mona.{n}", torch.full(p.shape, i + 0.5))
    loaded = load_authors_checkpoint(model, {**their_parts(theirs, "segmentation"), "mona": mona})
    state = model.state_dict()
    for key, value in mona.items():
        block, param = key.removeprefix("clip_model.visual.transformer.resblocks.").split(".mona.")
        ours = f"encoder.visual.transformer.resblocks.{block}.mona_mlp.{param}"
        assert (ours in loaded) == (int(block) <= 2)
        assert int(block) > 2 or torch.equal(state[ours], value)
    with pytest.raises(ValueError, match=r"trainable tensors of the task not in the file: \['encoder.visual"):
        load_authors_checkpoint(model, their_parts(theirs, "segmentation"))


def test_load_refuses_what_does_not_fit(tmp_path):
    cls_src = their_parts(their_modules("authors_src", width=64), "classification")
    release = ClassificationTask(**TINY, head="authors_release", num_classes=CLASSES)
    with pytest.raises(ValueError, match="cls_head is that of head: authors_src"):
        load_authors_checkpoint(release, cls_src)
    with pytest.raises(ValueError, match="has no 'seg_head'"):
        load_authors_checkpoint(SegmentationTask(**TINY, head="authors_src"), cls_src)
    with pytest.raises(ValueError, match="head='paper'"):
        load_authors_checkpoint(SegmentationTask(**TINY), cls_src)
    seg = their_parts(their_modules("authors_src"), "segmentation")  # width 12, the task's 64
    with pytest.raises(
        ValueError, match=r"shapes that differ: \['head.reduces.0.weight: file \(8, 12\), task \(8, 64\)"
    ):
        load_authors_checkpoint(SegmentationTask(**TINY, head="authors_src", num_classes=CLASSES), seg)
    plain = SegmentationTask(**TINY, head="authors_src", num_classes=CLASSES)
    seg = their_parts(their_modules("authors_src", width=64), "segmentation")
    seg["mona"] = _mona_tensors("clip_model.visual.transformer.resblocks", range(1))
    with pytest.raises(
        ValueError, match=r"keys the task does not have: \['encoder.visual.transformer.resblocks.0.mona"
    ):
        load_authors_checkpoint(plain, seg)


def test_release_checkpoint_with_its_mona_loads_into_the_released_placement(tmp_path):
    """The whole paper-release ``adapter_components.pth`` (head parts and the Mona of all 12 vision and 12 text
    blocks) into ``head: authors_release`` + ``placement: released``: every Mona tensor of the built blocks lands in
    the one shared ``mona`` module under its own name, strictly, and the logits are their head over the activations
    of the encoder that now holds their Mona. Catches: Mona keys mapped to ``mona_mlp`` or a wrong block."""
    model = SegmentationTask(
        **TINY,
        head="authors_release",
        adapter="mona",
        adapter_kwargs={"placement": "released"},
        num_classes=CLASSES,
        normalization="none",
    ).eval()
    theirs = their_modules("authors_release", width=64, img=64)
    mona: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(5)
    for tower in ("clip_model.visual.transformer.resblocks", "clip_model.transformer.resblocks"):
        for i in range(12):
            for n, p in model.encoder.visual.transformer.resblocks[0].mona.named_parameters():
                mona[f"{tower}.{i}.mona.{n}"] = 0.05 * torch.randn(p.shape, generator=generator)
    path = tmp_path / "adapter_components.pth"
    torch.save({**their_parts(theirs, "segmentation"), "mona": mona}, path)
    loaded = load_authors_checkpoint(model, path)
    built = range(len(model.encoder.visual.transformer.resblocks))  # blocks 0-3 (layers up to 3)
    for i in built:
        for n, p in model.encoder.visual.transformer.resblocks[i].mona.named_parameters():
            assert torch.equal(p, mona[f"clip_model.visual.transformer.resblocks.{i}.mona.{n}"])
            assert f"encoder.visual.transformer.resblocks.{i}.mona.{n}" in loaded
    assert not any(".mona_" in k for k in loaded)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = their_forward(
            theirs, "authors_release", "segmentation", their_visual_activations(model.encoder.visual, images, [1, 2, 3])
        )
        assert (model(images) - expected).abs().max() <= 1e-5
