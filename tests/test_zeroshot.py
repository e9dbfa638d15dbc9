"""Zero-shot classification: shipped prompts, prompt averaging, class order, errors, the test run."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from usclip.cli import main
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


VL_CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "vision_language").glob("*.yaml"))


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
