"""The caption chain of Fig. 1a and the authors' caption settings.

CURD-style reports (not in English) -> ``usclip captions refine`` -> caption fine-tuning on PMC-OA-style pairs and
the refined reports together (``configs/captions_pmcoa_curd.yaml``) -> adapter file -> segmentation starting from
it. Also: the frozen logit scale, no image augmentation, the text embedding cache and the caption sources.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_refine import FakeLLM
from usclip.cli import main
from usclip.data import CaptionDataModule, CaptionSource
from usclip.data.captions import CaptionDataset, read_captions
from usclip.data.splits import read_split_file
from usclip.data.synthetic import write_synthetic_dataset
from usclip.data.transforms import build_transform
from usclip.tasks import CaptionFinetuneTask, SegmentationTask

REPO = Path(__file__).parents[1]
PAPER_CONF = REPO / "configs" / "captions_pmcoa_curd.yaml"
SEG_CONF = Path(__file__).parent / "conf" / "segmentation_mona.yaml"
TINY = {"model_name": "usclip-test-vit", "pretrained": None, "layers": [1, 3], "image_size": 64}


# ----------------------------------------------------------------------------- synthetic caption sources
def _synthetic(tmp_path: Path, n: int = 32) -> tuple[Path, list[dict[str, str]]]:
    syn = write_synthetic_dataset(tmp_path / "syn", num_samples=n, size=96, seed=0)
    with (syn / "captions.csv").open() as f:
        return syn, list(csv.DictReader(f))


def _report(i: int) -> str:
    return f"病例{i}：超声见低回声结节，边界清楚，形态规则。"  # a CURD-like report in Chinese, unique per image


def _sources(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """``finetune/pmc_oa`` (16 images, own train/val files) and ``finetune/curd`` (16 images of 8 patients, reports).

    Returns the root and the English caption each Chinese report should be refined to.
    """
    syn, rows = _synthetic(tmp_path)
    root = tmp_path / "finetune"
    pmc, curd = root / "pmc_oa", root / "curd"
    (pmc / "images").mkdir(parents=True)
    (curd / "images").mkdir(parents=True)
    lines: dict[str, list[str]] = {"train": [], "val": []}
    for i, row in enumerate(rows[:16]):
        name = f"PMC{1000 + i}_Fig{i % 3 + 1}.png"
        shutil.copy(syn / "images" / f"{row['id']}.png", pmc / "images" / name)
        lines["train" if i < 12 else "val"].append(json.dumps({"image": name, "caption": row["caption"]}))
    for split, text in lines.items():
        (pmc / f"{split}.jsonl").write_text("\n".join(text) + "\n")
    english: dict[str, str] = {}
    reports = []
    for i, row in enumerate(rows[16:]):
        name = f"curd_{i:03d}.png"
        shutil.copy(syn / "images" / f"{row['id']}.png", curd / "images" / name)
        reports.append(
            json.dumps({"id": i, "image": name, "patient": f"p{i // 2}", "report": _report(i)}, ensure_ascii=False)
        )
        english[_report(i)] = row["caption"]
    (curd / "reports.jsonl").write_text("\n".join(reports) + "\n", encoding="utf-8")
    return root, english


def _refine(root: Path, english: dict[str, str]) -> None:
    """``usclip captions refine`` against a scripted OpenAI-compatible server that "translates" the reports."""

    def script(body: dict, n: int) -> tuple:
        answer = english[body["messages"][1]["content"]]
        return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]}

    llm = FakeLLM(script)
    try:
        args = ["captions", "refine", str(root / "curd" / "reports.jsonl"), str(root / "curd" / "captions_en.jsonl")]
        with pytest.raises(SystemExit) as done:
            main([*args, "--base-url", llm.base_url, "--model", "qwen3-8b", "--text-key", "report", "-q"])
        assert done.value.code == 0
    finally:
        llm.server.shutdown()


PMC = CaptionSource(name="pmc_oa", train="pmc_oa/train.jsonl", val="pmc_oa/val.jsonl", images="pmc_oa/images")


def _curd(**kwargs) -> CaptionSource:
    fields = {"captions": "curd/captions_en.jsonl", "images": "curd/images", "group_key": "patient"}
    return CaptionSource(name="curd", **{**fields, "val_fraction": 0.25, **kwargs})


# ----------------------------------------------------------------------------- the whole chain through the CLI
def test_reports_refined_then_caption_fit_on_both_sources_then_segmentation(tmp_path: Path):
    root, english = _sources(tmp_path)
    _refine(root, english)
    refined = [json.loads(line) for line in (root / "curd" / "captions_en.jsonl").read_text("utf-8").splitlines()]
    assert [r["caption"] for r in refined] == list(english.values())  # English captions in the caption key
    assert all(r["original"] == _report(r["id"]) and r["patient"] == f"p{r['id'] // 2}" for r in refined)

    common = [f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", f"--trainer.default_root_dir={tmp_path}"]
    tiny = ["--model.init_args.model_name=usclip-test-vit", "--model.init_args.pretrained=null"]
    tiny += ["--model.init_args.layers=[1,3]", "--data.init_args.image_size=64", "--data.init_args.batch_size=4"]
    tiny += ["--data.init_args.num_workers=0", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"]
    short = ["--trainer.max_epochs=1", "--model.init_args.validate_every=null", "--trainer.log_every_n_steps=1"]
    cli = main(["fit", "--config", str(PAPER_CONF), f"--data.init_args.root={root}", *tiny, *short, *common])
    task, dm = cli.model, cli.datamodule
    assert isinstance(task, CaptionFinetuneTask) and isinstance(dm, CaptionDataModule)
    assert dm.augmentations == {} and task.hparams["temperature"] == "pretrained"

    # only Mona trained: the optimiser holds exactly the visual Mona tensors, not the logit scale or the text tower
    in_optimizer = {id(p) for g in cli.trainer.optimizers[0].param_groups for p in g["params"]}
    mona = {id(p) for n, p in task.named_parameters() if n.startswith("encoder.visual.") and ".mona" in n}
    assert mona and in_optimizer == mona
    scale = task.encoder.logit_scale
    assert not scale.requires_grad and float(scale) == pytest.approx(math.log(1 / 0.07))  # open_clip's init value
    assert float(task.logit_scale()) == pytest.approx(1 / 0.07, rel=1e-6)

    # both sources served, each by its rule; CURD patients never straddle train and val
    run = Path(cli.trainer.log_dir)
    splits = {s: read_split_file(run / "splits" / f"{s}.txt") for s in ("train", "val")}
    pmc = {s: sorted(k.removeprefix("pmc_oa/") for k in splits[s] if k.startswith("pmc_oa/")) for s in splits}
    assert pmc["train"] == sorted(f"PMC{1000 + i}_Fig{i % 3 + 1}.png" for i in range(12)) and len(pmc["val"]) == 4
    patient = {f"curd/curd_{i:03d}.png": i // 2 for i in range(16)}
    curd = {s: {patient[k] for k in splits[s] if k.startswith("curd/")} for s in splits}
    assert curd["train"] and curd["val"] and not curd["train"] & curd["val"]
    assert len(curd["train"]) + len(curd["val"]) == 8
    # the frozen text tower's embeddings are cached by token ids (the tiny tower reads 16 tokens, so captions that
    # differ only later share an entry); every validation caption is in, nothing else
    keys = {row.tobytes() for row in task.tokenize([*(r["caption"] for r in refined), *_pmc_captions(root)]).numpy()}
    val_keys = {row.tobytes() for row in task.tokenize([p.caption for p in dm._source_pairs["val"]]).numpy()}
    assert val_keys <= set(task._text_cache) <= keys

    best = run / "adapters" / "best.safetensors"
    saved = load_file(best)
    assert best.is_file() and saved and all(".mona" in k for k in saved)
    seg_args = ["--config", str(SEG_CONF), f"--data.init_args.root={tmp_path / 'seg'}", *common]
    seg = main(["fit", *seg_args, "--model.init_args.layers=[1,3]", f"--model.init_args.adapter_checkpoint={best}"])
    assert seg.trainer.state.finished and seg.model.hparams["adapter_checkpoint"] == str(best)
    fresh = SegmentationTask(**TINY, adapter_checkpoint=str(best)).encoder.adapter_state_dict()
    assert set(fresh) == set(saved) and all(torch.equal(fresh[k], saved[k]) for k in saved)


def _pmc_captions(root: Path) -> list[str]:
    return [p.caption for f in ("train", "val") for p in read_captions(root / "pmc_oa" / f"{f}.jsonl", False)]


# ----------------------------------------------------------------------------- caption sources
def _refined_root(tmp_path: Path) -> Path:
    root, english = _sources(tmp_path)
    lines = []
    for line in (root / "curd" / "reports.jsonl").read_text("utf-8").splitlines():
        record = json.loads(line)
        lines.append(json.dumps({**record, "caption": english[record.pop("report")]}))
    (root / "curd" / "captions_en.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_sources_keep_their_split_rules_and_have_no_test_split(tmp_path: Path):
    root = _refined_root(tmp_path)
    dm = CaptionDataModule(sources=[PMC, _curd()], root=str(root), image_size=64, batch_size=4)
    dm.setup("fit")
    train, val = dm._dataset("train"), dm._dataset("val")
    assert isinstance(train, CaptionDataset) and isinstance(val, CaptionDataset)
    assert len(train) + len(val) == 32
    assert sum(p.image.parent.parent.name == "pmc_oa" for p in train.pairs) == 12  # the source's own train file
    val_patients = {p.group for p in val.pairs if p.group is not None}
    assert len(val_patients) == 2  # 0.25 of 8 patients, whole patients
    assert not val_patients & {p.group for p in train.pairs}
    assert all(p.caption and not p.caption.startswith("病例") for p in train.pairs)
    # the same split seed gives the same split; another seed moves patients
    again = CaptionDataModule(sources=[PMC, _curd()], root=str(root), image_size=64, split_seed=0)
    again.setup("fit")
    assert again.splits == dm.splits
    other = CaptionDataModule(sources=[PMC, _curd()], root=str(root), image_size=64, split_seed=3)
    other.setup("fit")
    assert other.splits["val"] != dm.splits["val"]
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64) and len(batch["caption"]) == 4
    with pytest.raises(ValueError, match="train and val splits only"):
        dm._dataset("test")


def test_pmc_oa_refined_overlay_reads_the_llm_captions(tmp_path: Path):
    """configs/captions/pmcoa_refined.yaml: PMC-OA's captions go through ``usclip captions refine`` too (the authors'
    caption file has a refined caption on every line, release:dataset_finetune.py:181-182) and the caption run reads
    the refined PMC-OA files, CURD's as before (configs/captions_pmcoa_curd.yaml alone reads PMC-OA's own captions).

    Catches: the overlay pointing at the original PMC-OA files, or dropping the CURD source.
    """
    root = _refined_root(tmp_path)
    answers = {c: f"refined pmc caption {i}" for i, c in enumerate(sorted(set(_pmc_captions(root))))}

    def script(body: dict, n: int) -> tuple:
        answer = answers[body["messages"][1]["content"]]
        return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]}

    llm = FakeLLM(script)
    try:
        for split in ("train", "val"):
            io = [str(root / "pmc_oa" / f"{split}.jsonl"), str(root / "pmc_oa" / f"{split}_refined.jsonl")]
            with pytest.raises(SystemExit) as done:
                main(
                    ["captions", "refine", *io, "--base-url", llm.base_url, "--model", "qwen3-8b", "--id-key", "image"]
                )
            assert done.value.code == 0
    finally:
        llm.server.shutdown()

    args = ["--config", str(PAPER_CONF), "--config", str(REPO / "configs" / "captions" / "pmcoa_refined.yaml")]
    args += ["--model.init_args.model_name=usclip-test-vit", "--model.init_args.pretrained=null"]
    args += ["--model.init_args.layers=[1,3]", "--data.init_args.image_size=64", f"--data.init_args.root={root}"]
    dm = main([*args, f"--trainer.default_root_dir={tmp_path}"], run=False).datamodule
    dm.setup("fit")
    pairs = [*dm._dataset("train").pairs, *dm._dataset("val").pairs]
    source = {s: sorted(p.caption for p in pairs if p.image.parent.parent.name == s) for s in ("pmc_oa", "curd")}
    assert source["pmc_oa"] == sorted(answers.values())  # all 16, train and val, refined
    curd = read_captions(root / "curd" / "captions_en.jsonl", False)
    assert source["curd"] == sorted(p.caption for p in curd) and len(curd) == 16  # CURD's source unchanged


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ({"name": "x", "captions": "a.jsonl", "train": "t.jsonl"}, "either captions"),
        ({"name": "x", "train": "t.jsonl"}, "both train and val"),
        ({"name": "x", "captions": "a.jsonl", "val_fraction": 1.0}, r"val_fraction must be in \(0, 1\)"),
        ({"name": "x", "train": "t.jsonl", "val": "v.jsonl", "group_key": "patient"}, "group_key applies"),
        ({"name": "a/b", "captions": "a.jsonl"}, "without '/'"),
    ],
)
def test_bad_sources_are_named(source: dict, match: str):
    with pytest.raises(ValueError, match=match):
        CaptionDataModule(sources=[CaptionSource(**source)])


def test_source_files_are_checked(tmp_path: Path):
    root = _refined_root(tmp_path)
    with pytest.raises(ValueError, match="names must be unique"):
        CaptionDataModule(sources=[PMC, PMC])
    with pytest.raises(FileNotFoundError, match=r"sources\['curd'\]\.captions=.*nope\.jsonl"):
        CaptionDataModule(sources=[_curd(captions="curd/nope.jsonl")], root=str(root)).setup("fit")
    with pytest.raises(ValueError, match="group_key='ward' is missing"):
        CaptionDataModule(sources=[_curd(group_key="ward")], root=str(root)).setup("fit")


def test_read_captions_utf8_bom_caption_key_and_image_root(tmp_path: Path):
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.png").write_bytes(b"")
    # a spreadsheet export: UTF-8 with a byte-order mark, Chinese text, and the authors' "refined" column
    (tmp_path / "c.csv").write_text("image,caption,refined\na.png,甲状腺结节,a thyroid nodule\n", encoding="utf-8-sig")
    pairs = read_captions(tmp_path / "c.csv", image_root=images)
    assert pairs[0].caption == "甲状腺结节" and pairs[0].image == images / "a.png"
    assert read_captions(tmp_path / "c.csv", image_root=images, caption_key="refined")[0].caption == "a thyroid nodule"
    with pytest.raises(ValueError, match="caption column \\(report\\)"):
        read_captions(tmp_path / "c.csv", image_root=images, caption_key="report")


# ----------------------------------------------------------------------------- no augmentation
@pytest.mark.parametrize("augmentations", [{}, None])
def test_without_augmentation_train_images_are_the_eval_images(tmp_path: Path, augmentations):
    root = _refined_root(tmp_path)
    dm = CaptionDataModule(sources=[PMC], root=str(root), image_size=48, augmentations=augmentations, crop="none")
    dm.setup("fit")
    train = dm._dataset("train")
    assert isinstance(train, CaptionDataset)
    plain = CaptionDataset(train.pairs, build_transform(48, None), crop="none")  # the evaluation transform
    same = [torch.equal(train[i]["image"], plain[i]["image"]) for i in range(len(train))]
    if augmentations == {}:
        assert all(same)
    else:  # usclip's default augmentation changes some of them: the switch is what makes them equal
        assert not all(same)


# ----------------------------------------------------------------------------- temperature and logit scale
def _task(**kwargs) -> CaptionFinetuneTask:
    torch.manual_seed(0)
    return CaptionFinetuneTask(**{**TINY, "adapter": "mona", **kwargs})


BATCHES = [
    ["an oval mass", "a round lesion", "an oval mass", "a spiculated mass"],  # a duplicate inside a batch
    ["a round lesion", "a cyst", "a shadowing mass", "an oval mass"],  # and across batches
    ["a cyst", "a spiculated mass", "a calcified nodule", "a round lesion"],
]


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.rand(4, 3, 64, 64, generator=g) for _ in BATCHES]


def test_pretrained_temperature_uses_the_checkpoint_scale_frozen():
    task = _task(temperature="pretrained")
    scale = task.encoder.logit_scale
    with torch.no_grad():
        scale.fill_(math.log(100.0))  # OpenAI CLIP's trained value
    assert float(task.logit_scale()) == pytest.approx(100.0)  # not 1/0.07, not clamped below
    assert not scale.requires_grad
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-2)
    image, text = task.embed({"image": _images()[0], "caption": BATCHES[0]})
    task.criterion(image, text, task.logit_scale()).backward()
    opt.step()
    assert scale.grad is None and float(scale) == pytest.approx(math.log(100.0))
    assert not any(p is scale for g in opt.param_groups for p in g["params"])


# ----------------------------------------------------------------------------- text embedding cache
def _train(task: CaptionFinetuneTask, epochs: int = 3) -> tuple[list[float], int]:
    """AdamW steps over BATCHES for some epochs; returns the losses and how often the text tower ran."""
    calls = [0]
    task.encoder.text_model.transformer.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(1)  # Mona's dropout draws the same masks in both runs
    losses = []
    for _ in range(epochs):
        for images, captions in zip(_images(), BATCHES, strict=True):
            image, text = task.embed({"image": images, "caption": captions})
            loss = task.criterion(image, text, task.logit_scale())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
    return losses, calls[0]


def test_text_cache_gives_the_uncached_losses_and_runs_the_text_tower_once_per_caption_batch():
    cached_task = _task(temperature=0.07)
    uncached, n_uncached = _train(_task(temperature=0.07, cache_text=False))
    cached, n_cached = _train(cached_task)
    assert cached_task.text_cache_active()
    torch.testing.assert_close(cached, uncached, rtol=1e-6, atol=1e-7)
    assert cached[: len(BATCHES)] == uncached[: len(BATCHES)]  # first epoch: the very same computation
    assert n_uncached == 3 * len(BATCHES) and n_cached == len(BATCHES)  # later epochs never run the text tower
    assert len(cached_task._text_cache) == len({c for b in BATCHES for c in b})
    cached_task.load_state_dict(cached_task.state_dict())
    assert not cached_task._text_cache  # loading weights empties it


def test_text_cache_is_bypassed_while_the_text_tower_trains():
    lora = _task(text_adapter="lora", text_adapter_kwargs={"r": 2})
    assert not lora.text_cache_active()
    _, calls = _train(lora, epochs=2)
    assert calls == 2 * len(BATCHES) and not lora._text_cache

    task = _task()
    task.encode_captions(BATCHES[0])
    assert task._text_cache
    task.encoder.text_model.token_embedding.weight.requires_grad_(True)  # a text tensor becomes trainable
    text = task.encode_captions(BATCHES[0])
    assert not task._text_cache and text.requires_grad  # stale entries dropped, embeddings computed live
