"""Zero-shot classification: shipped prompts, prompt averaging, class order, errors, the test run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from usclip.cli import main
from usclip.data import ZeroShotDataModule
from usclip.tasks import ZeroShotClassifier
from usclip.tasks.zeroshot import count_tokens, list_prompt_files, read_prompts

CONF_DIR = Path(__file__).parent / "conf" / "vision_language"
TINY_PROMPTS = CONF_DIR / "prompts_tiny.yaml"
TINY = {"model_name": "usclip-test-vit", "pretrained": None, "layers": [1, 3], "image_size": 64}
#: the paper's prompts (arXiv:2506.08849), with the class name as the last word
PAPER = {
    "lymph_node": "Benign: Oval shape, preserved echogenic hilum, thin homogeneous cortex. Malignant: Round, absent "
    "hilum, thickened/heterogeneous cortex, microcalcifications, irregular margins.The abnormality in this lymph node "
    "scan is {}",
    "breast": "Benign: Oval shape, smooth margins, parallel orientation, homogeneous hypoechoic echotexture, posterior "
    "enhancement. Malignant: Irregular shape, spiculated margins, non-parallel orientation, heterogeneous hypoechoic "
    "echotexture, microcalcifications, posterior acoustic shadowing. The abnormality in this breast scan is {}",
}


def _classifier(**kwargs) -> ZeroShotClassifier:
    torch.manual_seed(0)
    return ZeroShotClassifier(**{**TINY, "prompts": str(TINY_PROMPTS), **kwargs}).eval()


@pytest.mark.parametrize("name", ["breast", "lymph_node"])
def test_shipped_prompts_are_the_papers_and_fit_77_tokens(name: str):
    assert name in list_prompt_files()
    prompts = read_prompts(name)
    assert prompts == {c: [PAPER[name].format(c)] for c in ("benign", "malignant")}
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    assert tokenizer.context_length == 77
    texts = [p for ps in prompts.values() for p in ps]
    counts = [count_tokens(tokenizer, p) for p in texts]  # untruncated, start and end tokens included
    assert counts == [74, 74] if name == "breast" else [57, 57]
    # what ships is what the model reads: the tokenizer cuts nothing off
    assert ((tokenizer(texts) != 0).sum(1) == torch.tensor(counts)).all()


def test_class_embeddings_average_normalised_prompt_embeddings():
    clf = _classifier(class_names=["benign", "malignant"])
    clf.prepare_classes()
    enc = clf.encoder
    rows = []
    for name in ("benign", "malignant"):
        e = enc.encode_text(clf.tokenizer(read_prompts(TINY_PROMPTS)[name]), normalize=False)
        assert e.shape[0] == 2  # two prompts per class in the tiny file
        mean = (e / e.norm(dim=-1, keepdim=True)).mean(0)
        rows.append(mean / mean.norm())
    expected_classes = torch.stack(rows)
    torch.testing.assert_close(clf.class_embeddings, expected_classes)
    images = torch.rand(3, 3, 64, 64)
    img = F.normalize(enc.encode_image((images - clf.pixel_mean) / clf.pixel_std, normalize=False), dim=-1)
    expected = enc.logit_scale.exp() * img @ expected_classes.T
    torch.testing.assert_close(clf(images), expected)
    assert float(enc.logit_scale.exp()) == pytest.approx(1 / 0.07, rel=1e-5)  # open_clip's initial logit scale


def test_similarity_averaging_is_the_mean_of_scaled_cosines_over_prompts():
    """The authors' scoring: mean over a class's prompts of scale * cos(image, prompt), not renormalised."""
    clf = _classifier(class_names=["benign", "malignant"], prompt_averaging="similarity")
    images = torch.rand(3, 3, 64, 64)
    enc = clf.encoder
    img = F.normalize(enc.encode_image((images - clf.pixel_mean) / clf.pixel_std, normalize=False), dim=-1)
    scale = enc.logit_scale.exp()
    expected = []
    for name in ("benign", "malignant"):
        e = F.normalize(enc.encode_text(clf.tokenizer(read_prompts(TINY_PROMPTS)[name]), normalize=False), dim=-1)
        expected.append((scale * img @ e.T).mean(1))  # (B,) mean over the two prompts
    torch.testing.assert_close(clf(images), torch.stack(expected, 1))
    default = _classifier(class_names=["benign", "malignant"])(images)
    assert not torch.allclose(default, clf(images))  # the class embeddings' norms differ from 1
    with pytest.raises(ValueError, match="prompt_averaging must be 'embedding' or 'similarity', got 'max'"):
        _classifier(prompt_averaging="max")


def test_class_order_follows_the_label_names():
    images = torch.rand(2, 3, 64, 64)
    a = _classifier(class_names=["benign", "malignant"])(images)
    b = _classifier(class_names=["Malignant", "Benign"])(images)  # matched case-insensitively
    torch.testing.assert_close(a, b.flip(1))


def test_errors_name_the_problem(tmp_path: Path):
    with pytest.raises(ValueError, match=r"has classes \['benign', 'malignant'\] but the data's label_names"):
        _classifier(class_names=["benign", "cancer"]).prepare_classes()
    with pytest.raises(RuntimeError, match="trains nothing"):
        _classifier().setup("fit")
    with pytest.raises(FileNotFoundError, match="neither a YAML file nor a shipped prompt set"):
        read_prompts("thyroid_nope")
    bad = tmp_path / "one.yaml"
    bad.write_text("classes:\n  benign: [a benign lesion]\n")
    with pytest.raises(ValueError, match="two or more classes"):
        read_prompts(bad)
    bad.write_text("classes:\n  benign: []\n  malignant: [x]\n")
    with pytest.raises(ValueError, match="'benign' needs a non-empty list"):
        read_prompts(bad)
    with pytest.raises(ValueError, match="74 tokens but 'usclip-test-vit' reads 16"):
        _classifier(prompts="breast")


def test_usclip_test_writes_accuracy_and_auc(tmp_path: Path):
    args = [
        "--config",
        str(CONF_DIR / "zeroshot.yaml"),
        f"--model.init_args.prompts={TINY_PROMPTS}",
        f"--data.init_args.root={tmp_path / 'data'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = main(["test", *args])
    results = Path(cli.trainer.log_dir) / "results"
    metrics = json.loads((results / "test_metrics.json").read_text())
    assert {"acc", "auc"} <= set(metrics) and metrics["num_images"] == len(cli.datamodule.splits["test"])
    rows = (results / "test_predictions.csv").read_text().splitlines()
    assert rows[0] == "id,label,prob_benign,prob_malignant" and len(rows) == metrics["num_images"] + 1
    with pytest.raises(RuntimeError, match="trains nothing"):
        main(["fit", *args])


def test_text_lora_file_from_caption_tuning_loads(tmp_path: Path):
    from usclip.adapters import save_adapters
    from usclip.tasks import CaptionFinetuneTask

    torch.manual_seed(0)
    tuned = CaptionFinetuneTask(**TINY, adapter="mona", text_adapter="lora", text_adapter_kwargs={"r": 2})
    for n, p in tuned.named_parameters():
        if ".lora_" in n:
            p.data.normal_()  # stands in for training
    save_adapters(tuned.encoder, tmp_path / "visual.safetensors", prefix="visual.")
    save_adapters(tuned.encoder, tmp_path / "text.safetensors", prefix="text_model.")
    clf = _classifier(
        adapter_checkpoint=str(tmp_path / "visual.safetensors"),
        text_adapter_checkpoint=str(tmp_path / "text.safetensors"),
        class_names=["benign", "malignant"],
    )
    want, have = tuned.encoder.adapter_state_dict(), clf.encoder.adapter_state_dict()
    assert set(want) == set(have) and any(k.startswith("text_model.") for k in have)
    assert all(torch.equal(want[k], have[k]) for k in want)
    assert not any(p.requires_grad for p in clf.parameters())
    tokens = clf.tokenizer(["a benign lesion"])
    torch.testing.assert_close(clf.encoder.encode_text(tokens), tuned.encoder.eval().encode_text(tokens))


VL_DIR = Path(__file__).parents[1] / "configs" / "vision_language"
#: overlays compose after a zero-shot config (no class_path of their own); the rest are whole configs
VL_OVERLAYS = [VL_DIR / "zeroshot_authors.yaml", VL_DIR / "zeroshot_authors_later.yaml"]
VL_CONFIGS = sorted(set(VL_DIR.glob("*.yaml")) - set(VL_OVERLAYS))


@pytest.mark.parametrize("config", VL_CONFIGS, ids=[c.name for c in VL_CONFIGS])
def test_vision_language_configs_instantiate(config: Path, tmp_path: Path):
    args = ["--config", str(config), "--model.init_args.model_name=usclip-test-vit", "--model.init_args.layers=[1,3]"]
    args += ["--model.init_args.pretrained=null", "--data.init_args.image_size=64", f"--data.init_args.root={tmp_path}"]
    if config.stem.startswith("zeroshot"):
        args.append(f"--model.init_args.prompts={TINY_PROMPTS}")  # the tiny text tower reads 16 tokens
    cli = main(args, run=False)
    assert cli.model.hparams["image_size"] == 64
    assert isinstance(cli.model, ZeroShotClassifier) == config.stem.startswith("zeroshot")


def test_every_shipped_prompt_fits_its_context():
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    for name in list_prompt_files():
        limit = 16 if name == "synthetic" else 77  # synthetic prompts also serve the tiny test model
        counts = [count_tokens(tokenizer, p) for ps in read_prompts(name).values() for p in ps]
        assert all(c is not None and c <= limit for c in counts), (name, counts)


def test_zeroshot_demo_rebuilds_the_caption_demos_model_and_split():
    """Random towers come back only from the same seed and config; the test split must be the held-out one."""
    import yaml

    caption, zeroshot = (
        yaml.safe_load((VL_CONFIGS[0].parent / f"{n}.yaml").read_text()) for n in ("captions_demo", "zeroshot_demo")
    )
    assert caption["seed_everything"] == zeroshot["seed_everything"]
    for key in ("model_name", "pretrained", "layers"):
        assert caption["model"]["init_args"][key] == zeroshot["model"]["init_args"][key], key
    for key in ("root", "image_size", "synthetic"):
        assert caption["data"]["init_args"][key] == zeroshot["data"]["init_args"][key], key
    # the setting that learns with random towers (docs/vision_language.md): text LoRA and a fixed temperature
    assert caption["model"]["init_args"]["text_adapter"] == "lora"
    assert caption["model"]["init_args"]["temperature"] == pytest.approx(0.2)


# ------------------------------------------------------------------------------ the authors' prompts and input
#: the authors' prompts, typed here from their files (jinggqu/NextGen-UIA). Release (commit 79d9ef8, the code of the
#: published zero-shot numbers): one f-string per dataset, ``{c}`` = the class name.
RELEASE = {
    # release:clip_cls_zero_shot.py:24
    "lymph_node": "Benign: Oval shape, preserved echogenic hilum, thin homogeneous cortex. Malignant: Round, lost "
    "hilum, thickened/heterogeneous cortex, microcalcifications, irregular margins.The abnormality in this lymph node "
    "scan is {}.",
    # release:clip_cls_zero_shot.py:33
    "breast": "Benign: Oval shape, smooth margins, parallel orientation, homogeneous hypoechoic echotexture, posterior "
    "enhancement. Malignant: Irregular shape, spiculated margins, non-parallel orientation, heterogeneous hypoechoic "
    "echotexture, microcalcifications, posterior shadowing. The abnormality in this breast scan is {}.",
}
#: later code (commit 2e5fd63): ten prompts per class
LATER = {
    "lymph_node": {
        "benign": [  # later:src/models/zero_shot_prompt.py:4-13
            "A benign lymph node with an oval shape and a preserved fatty hilum",
            "A benign lymph node with a long-to-short axis ratio greater than 2",
            "A benign lymph node showing a clear, echogenic central hilum",
            "A benign lymph node with a smooth, well-defined border",
            "A benign lymph node characterized by its regular, oval morphology and homogeneous echotexture",
            "A benign lymph node with a thin, uniform cortex surrounding a prominent hilum",
            "A benign lymph node appearing as a well-defined, hypoechoic oval structure with a bright central hilum",
            "A benign lymph node featuring a distinct fatty hilum and regular shape",
            "A benign lymph node with normal morphology, including a visible hilum and uniform cortex",
            "A benign lymph node that is distinctly elongated and maintains its central echogenic hilum",
        ],
        "malignant": [  # later:src/models/zero_shot_prompt.py:16-25
            "A malignant lymph node with a round shape and an absent or effaced hilum",
            "A malignant lymph node with a long-to-short axis ratio less than 2",
            "A malignant lymph node with loss of the central fatty hilum",
            "A malignant lymph node with an irregular, spiculated, or blurred border",
            "A malignant lymph node containing internal microcalcifications",
            "A malignant lymph node showing internal cystic necrosis or liquefaction",
            "A malignant lymph node that is markedly hypoechoic and has a heterogeneous texture",
            "A malignant lymph node with eccentric cortical thickening",
            "A malignant lymph node appearing as a round, solid mass with indistinct margins",
            "A malignant lymph node characterized by a round shape and heterogeneous internal echoes",
        ],
    },
    "breast": {
        "benign": [  # later:src/models/zero_shot_prompt.py:31-40
            "A benign nodule with an oval shape and circumscribed margins",
            "A benign nodule with a parallel orientation, appearing wider-than-tall",
            "A benign nodule, simple cyst which is anechoic with posterior acoustic enhancement",
            "A benign nodule that is well-circumscribed and has a homogeneous echo pattern",
            "A benign nodule with a smooth border and an oval shape",
            "A benign nodule appearing as a solid, oval, and circumscribed mass",
            "A benign nodule with a gently lobulated but well-defined margin",
            "A benign nodule that is isoechoic and has a distinct, thin echogenic capsule",
            "A benign nodule with an oval shape, parallel orientation, and circumscribed margin",
            "A benign nodule with regular morphology and well-defined borders",
        ],
        "malignant": [  # later:src/models/zero_shot_prompt.py:43-52
            "A malignant nodule with an irregular shape and spiculated margins",
            "A malignant nodule with a non-parallel orientation, appearing taller-than-wide",
            "A malignant nodule causing posterior acoustic shadowing",
            "A malignant nodule with indistinct or angular margins",
            "A malignant nodule containing internal microcalcifications",
            "A malignant nodule that is markedly hypoechoic and has an irregular shape",
            "A malignant nodule with a heterogeneous echo pattern and ill-defined borders",
            "A malignant nodule with microlobulated margins",
            "A malignant nodule that is irregular in shape and demonstrates posterior shadowing",
            "A malignant nodule with suspicious morphology, including an irregular shape and non-circumscribed margins",
        ],
    },
}
#: usclip-demo-vit reads 77 tokens, as CLIP ViT-B/16 does, so the authors' long prompts fit untruncated
DEMO = {"model_name": "usclip-demo-vit", "pretrained": None, "layers": [1, 3], "image_size": 128}


def _tokenised_texts(clf: ZeroShotClassifier) -> dict[str, list[str]]:
    """The texts the task hands its tokenizer for each class while it prepares the classes."""
    seen: list[list[str]] = []
    tokenizer = clf.tokenizer

    def recording(texts: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(list(texts))
        return tokenizer(texts, *args, **kwargs)

    clf.tokenizer = recording
    clf.prepare_classes()
    clf.tokenizer = tokenizer
    return dict(zip(clf.class_order, seen, strict=True))


@pytest.mark.parametrize("organ", ["lymph_node", "breast"])
@pytest.mark.parametrize("prompt_set", ["release", "later"])
def test_authors_prompt_sets_are_their_strings(organ: str, prompt_set: str):
    """What the task tokenises per class is the authors' text, character for character, and fits 77 tokens."""
    torch.manual_seed(0)
    clf = ZeroShotClassifier(**DEMO, prompts=organ, prompt_set=prompt_set, class_names=["malignant", "benign"]).eval()
    expected = (
        {c: [RELEASE[organ].format(c)] for c in ("malignant", "benign")} if prompt_set == "release" else LATER[organ]
    )
    texts = _tokenised_texts(clf)
    assert texts == {c: expected[c] for c in ("malignant", "benign")}  # in the data's class order
    counts = [count_tokens(clf.tokenizer, t) for ts in texts.values() for t in ts]
    assert max(c or 99 for c in counts) <= 77
    if prompt_set == "release":  # the paper's words (usclip's default) differ exactly where the issue says
        paper = read_prompts(organ)["benign"][0]
        assert paper + "." != texts["benign"][0]
        words = ("absent", "lost") if organ == "lymph_node" else ("posterior acoustic shadowing", "posterior shadowing")
        assert paper.replace(*words) + "." == texts["benign"][0]
        assert counts == ([58, 58] if organ == "lymph_node" else [74, 74])


def test_prompt_set_errors_name_the_problem(tmp_path: Path):
    with pytest.raises(ValueError, match=r"prompt_set must be one of .*got 'draft'"):
        ZeroShotClassifier(**TINY, prompt_set="draft")
    with pytest.raises(FileNotFoundError, match=r"prompt file 'synthetic_release' \(prompt_set='release'\) is not"):
        read_prompts("synthetic", "release")
    with pytest.raises(ValueError, match="is a file of its own"):
        read_prompts(TINY_PROMPTS, "later")
    with pytest.raises(ValueError, match=r"logit_scale must be a positive number or null .* got 0\.0"):
        ZeroShotClassifier(**TINY, logit_scale=0.0)


def test_authors_scoring_is_100_cosine_of_the_unit_range_image():
    """The overlay's task: 100 x cos(image, prompt) of the [0, 1] image, prompts of the release, no mean/std."""
    init = yaml.safe_load((VL_DIR / "zeroshot_authors.yaml").read_text())["model"]["init_args"]
    torch.manual_seed(0)
    clf = ZeroShotClassifier(**DEMO, prompts="breast", class_names=["benign", "malignant"], **init).eval()
    clip = clf.encoder.text_model
    tokens = open_clip.tokenize([RELEASE["breast"].format(c) for c in ("benign", "malignant")])  # one per class
    images = torch.rand(3, 3, 128, 128) * 0.5  # in [0, 0.5]: CLIP's mean/std would shift every value
    with torch.no_grad():
        img = clip.encode_image(images)
        txt = clip.encode_text(tokens)
        expected = 100.0 * (img / img.norm(dim=-1, keepdim=True)) @ (txt / txt.norm(dim=-1, keepdim=True)).T
        got = clf(images)
    torch.testing.assert_close(got / 100, expected / 100, atol=1e-6, rtol=0)  # cosines, float32 rounding
    assert float(clip.logit_scale.exp()) != pytest.approx(100.0)  # the fixed 100 is used, not the model's scale
    assert init["prompt_set"] == "release" and init["normalization"] == "none"


def _write_image_folder(root: Path, size: tuple[int, int]) -> dict[str, Path]:
    """Three 8-bit PNGs of one size, as the authors' files could be: grey, RGB with unequal channels, palette.

    Speckle inside a black frame, so that usclip's scan-area crop (``crop: auto``) has something to cut.
    """
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rgb = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    h, w = size[1], size[0]
    rgb[h // 8 : h - h // 6, w // 5 : w - w // 7] = rng.integers(40, 256, (h - h // 6 - h // 8, w - w // 7 - w // 5, 3))
    files = {
        "grey": Image.fromarray(rgb[..., 0], "L"),
        "rgb": Image.fromarray(rgb, "RGB"),
        "palette": Image.fromarray(rgb, "RGB").convert("P"),
    }
    paths = {}
    for name, im in files.items():
        paths[name] = root / "images" / f"{name}.png"
        im.save(paths[name])
    (root / "labels.csv").write_text("id,label\ngrey,benign\nrgb,malignant\npalette,benign\n")
    return paths


def test_authors_input_is_the_file_as_their_loader_reads_it(tmp_path: Path):
    """On 224 x 224 files (what the authors' loader needs) the overlay's data settings give their tensors exactly."""
    import torchvision.transforms as T

    paths = _write_image_folder(tmp_path / "d", (224, 224))
    data = yaml.safe_load((VL_DIR / "zeroshot_authors.yaml").read_text())["data"]["init_args"]
    dm = ZeroShotDataModule(
        root=str(tmp_path / "d"), score_on="all", image_size=224, label_names=["benign", "malignant"], **data
    )
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    # their loader (release:dataset_cls_zero_shot.py:15, 27, 31, 35-36): PIL "L", ToTensor, float32, 3 channels
    theirs = T.Compose([T.ToTensor(), T.ConvertImageDtype(torch.float32)])
    for i, name in enumerate(batch["id"]):
        expected = theirs(Image.open(paths[name]).convert("L")).repeat(3, 1, 1)
        assert torch.equal(batch["image"][i], expected), name
    assert data == {"crop": "none"}
    # usclip's default crops the scan area first: not the authors' input
    default = ZeroShotDataModule(root=str(tmp_path / "d"), score_on="all", image_size=224)
    default.setup("test")
    assert not torch.equal(next(iter(default.test_dataloader()))["image"], batch["image"])


@pytest.mark.parametrize("overlay", VL_OVERLAYS, ids=[o.stem for o in VL_OVERLAYS])
def test_authors_overlays_compose_after_every_zero_shot_config(overlay: Path, fit_parser: Any):
    prompt_set = "later" if overlay.stem.endswith("later") else "release"
    for name, organ in (("ln1", "lymph_node"), ("ln2", "lymph_node"), ("busi", "breast")):
        base = VL_DIR / f"zeroshot_{name}.yaml"
        cfg = fit_parser.parse_args(["test", "--config", str(base), "--config", str(overlay)])
        model, data = cfg.test.model.init_args, cfg.test.data.init_args
        assert (model.prompts, model.prompt_set, model.normalization) == (organ, prompt_set, "none"), name
        assert (model.prompt_averaging, model.logit_scale, data.crop) == ("similarity", 100.0, "none"), name
        assert cfg.test.model.class_path == "usclip.tasks.ZeroShotClassifier"
        assert cfg.test.data.class_path == "usclip.data.ZeroShotDataModule"
        want = RELEASE[organ].format("malignant") if prompt_set == "release" else LATER[organ]["malignant"][0]
        assert read_prompts(model.prompts, model.prompt_set)["malignant"][0] == want


def test_zero_shot_test_is_identical_for_seeds_1_2_3(tmp_path: Path):
    """Nothing random runs at test time: the sweep needs one zero-shot run per cell, not one per seed."""
    torch.manual_seed(0)
    weights = tmp_path / "tiny_clip.pt"
    torch.save(open_clip.create_model("usclip-test-vit").state_dict(), weights)  # seed-independent towers
    outputs = []
    for seed in (1, 2, 3):
        cli = main([
            "test", "--config", str(CONF_DIR / "zeroshot.yaml"), f"--seed_everything={seed}",
            f"--model.init_args.prompts={TINY_PROMPTS}", f"--model.init_args.pretrained={weights}",
            f"--data.init_args.root={tmp_path / 'data'}", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        ])  # fmt: skip
        results = Path(cli.trainer.log_dir) / "results"
        outputs.append(
            ((results / "test_predictions.csv").read_bytes(), json.loads((results / "test_metrics.json").read_text()))
        )
    assert outputs[0][0].count(b"\n") > 2 and outputs[0][1]["num_images"] > 1
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]
