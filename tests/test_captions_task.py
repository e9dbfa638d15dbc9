"""CaptionFinetuneTask and CaptionDataModule: loss, recall, what trains, adapter files into segmentation."""

from __future__ import annotations

import json
import math
from itertools import islice
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from usclip.adapters import read_adapter_metadata
from usclip.cli import main
from usclip.data import CaptionDataModule, SyntheticSpec
from usclip.models import CLIPEncoder
from usclip.tasks import CaptionFinetuneTask, SegmentationTask
from usclip.tasks.contrastive import retrieval_recall

CONF = Path(__file__).parent / "conf" / "vision_language" / "captions_mona.yaml"
SEG_CONF = Path(__file__).parent / "conf" / "segmentation_mona.yaml"
TINY = {"model_name": "usclip-test-vit", "pretrained": None, "layers": [1, 3], "image_size": 64}


def _task(**kwargs) -> CaptionFinetuneTask:
    torch.manual_seed(0)
    return CaptionFinetuneTask(**{**TINY, "adapter": "mona", **kwargs})


def _batch() -> dict:
    torch.manual_seed(1)
    captions = ["an oval circumscribed mass", "an irregular spiculated mass", "a round lesion", "a shadowing lesion"]
    return {"image": torch.rand(4, 3, 64, 64), "caption": captions}


# ----------------------------------------------------------------------------- loss and recall by hand
def test_info_nce_matches_a_hand_computed_value():
    task = _task(temperature=0.5)
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = task.logit_scale()
    assert float(scale) == pytest.approx(2.0)
    # logits = 2 * image @ text.T = [[2, 1.2], [0, 1.6]]; image->text rows, text->image columns
    i2t = (-math.log(math.exp(2) / (math.exp(2) + math.exp(1.2))) - math.log(math.exp(1.6) / (1 + math.exp(1.6)))) / 2
    t2i = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))) / 2
    assert float(task.criterion(image, text, scale)) == pytest.approx((i2t + t2i) / 2, abs=1e-6)


def test_recall_on_a_hand_made_similarity_matrix():
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.2],  # image 0: own caption first
            [0.8, 0.1, 0.3, 0.0],  # image 1: caption 0 first, own caption (1) last of 4
            [0.1, 0.2, 0.3, 0.9],  # image 2: caption 3 first, which has the same text as caption 2
            [0.0, 0.5, 0.9, 0.1],  # image 3: caption 2 first, same text as its own caption 3
        ]
    )
    captions = ["a", "b", "c", "c"]
    r = retrieval_recall(sim, captions, ks=(1, 2, 4))
    assert r["i2t_r1"] == pytest.approx(3 / 4)  # images 0, 2, 3 hit (2 and 3 by identical text)
    assert r["i2t_r2"] == pytest.approx(3 / 4)  # image 1's own caption ranks 4th
    assert r["i2t_r4"] == pytest.approx(1.0)
    # text->image (columns): caption 0 -> image 0 (hit); caption 1 -> images 3, 2 (misses, image 1 ranks 3rd);
    # caption 2 -> image 3, whose caption has the same text (hit); caption 3 -> image 2 (hit)
    assert r["t2i_r1"] == pytest.approx(3 / 4)
    assert r["t2i_r2"] == pytest.approx(3 / 4)
    assert r["t2i_r4"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="similarity must be"):
        retrieval_recall(sim, captions[:3])


# ----------------------------------------------------------------------------- what trains
def _step(task: CaptionFinetuneTask) -> dict[str, torch.Tensor]:
    """One AdamW step on the contrastive loss; returns the state before it."""
    before = {k: v.detach().clone() for k, v in task.named_parameters()}
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-2)
    image, text = task.embed(_batch())
    task.criterion(image, text, task.logit_scale()).backward()
    opt.step()
    return before


def _changed(task: CaptionFinetuneTask, before: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, v in task.named_parameters() if not torch.equal(v.detach(), before[k])}


def test_text_tower_is_frozen_and_visual_adapters_and_logit_scale_train():
    task = _task()
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert "encoder.text_model.logit_scale" in trainable
    assert all(n.startswith("encoder.visual.") and ".mona" in n for n in trainable - {"encoder.text_model.logit_scale"})
    changed = _changed(task, _step(task))
    assert changed and changed <= trainable
    assert "encoder.text_model.logit_scale" in changed
    assert not any(n.startswith("encoder.text_model.") and "logit_scale" not in n for n in changed)


def test_text_lora_trains_the_text_tower_adapters_only():
    task = _task(text_adapter="lora", text_adapter_kwargs={"r": 2})
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    text_lora = {n for n in trainable if n.startswith("encoder.text_model.transformer.")}
    assert text_lora and all(".lora_" in n for n in text_lora)
    changed = _changed(task, _step(task))
    assert changed <= trainable
    assert changed & text_lora and any(n.startswith("encoder.visual.") for n in changed)


def test_fixed_temperature_is_not_trained():
    task = _task(temperature=0.07)
    scale = task.encoder.logit_scale
    assert not scale.requires_grad
    before = scale.detach().clone()
    _step(task)
    assert torch.equal(scale.detach(), before)
    assert float(task.logit_scale()) == pytest.approx(1 / 0.07)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, "temperature must be"),
        ({"temperature": "learned"}, "temperature must be .* .pretrained."),
        ({"context_length": 77}, r"context_length must be in \[1, 16\]"),  # the tiny text tower reads 16 tokens
        ({"text_adapter_kwargs": {"r": 2}}, "without text_adapter"),
        ({"text_adapter": "mona"}, "text_adapter must be 'lora'"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _task(**kwargs)


# ----------------------------------------------------------------------------- data
def test_datamodule_attaches_captions_and_keeps_images_in_one_split(tmp_path: Path):
    root = tmp_path / "syn"
    dm = CaptionDataModule(
        root=str(root), image_size=64, batch_size=4, synthetic=SyntheticSpec(num_samples=20, size=64)
    )
    dm.prepare_data()
    # a second caption for every image, as JSONL
    lines = [json.dumps({"id": f"syn_{i:05d}", "caption": f"extra caption {i}"}) for i in range(20)]
    rows = (root / "captions.csv").read_text().splitlines()[1:]
    lines += [json.dumps({"id": r.split(",")[0], "caption": "first"}) for r in rows]
    (root / "two.jsonl").write_text("\n".join(lines) + "\n")
    dm = CaptionDataModule(captions="two.jsonl", root=str(root), image_size=64, batch_size=4)
    dm.setup("fit")
    train, val = dm._dataset("train"), dm._dataset("val")
    assert len(train) == 2 * len(dm.splits["train"]) and len(val) == 2 * len(dm.splits["val"])
    batch = next(iter(dm.val_dataloader()))
    assert (
        batch["image"].shape == (4, 3, 64, 64)
        and 0.0 <= float(batch["image"].min()) <= float(batch["image"].max()) <= 1.0
    )
    assert all(isinstance(c, str) for c in batch["caption"])
    with pytest.raises(FileNotFoundError, match=r"nope\.csv"):
        CaptionDataModule(captions="nope.csv", root=str(root), image_size=64).setup("fit")
    (tmp_path / "other.csv").write_text("image,caption\nelsewhere.png,some text\n")
    (tmp_path / "elsewhere.png").write_bytes((root / "images" / "syn_00000.png").read_bytes())
    with pytest.raises(ValueError, match="is not an image of the dataset"):
        CaptionDataModule(captions=str(tmp_path / "other.csv"), root=str(root), image_size=64).setup("fit")


# ----------------------------------------------------------------------------- CLI: captions -> segmentation
def _args(conf: Path, tmp_path: Path, data: str) -> list[str]:
    return [
        "--config",
        str(conf),
        f"--data.init_args.root={tmp_path / data}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        f"--trainer.default_root_dir={tmp_path}",
    ]


def test_caption_adapters_start_segmentation(tmp_path: Path):
    cli = main(["fit", *_args(CONF, tmp_path, "captions")])
    run = Path(cli.trainer.log_dir)
    metrics = cli.trainer.callback_metrics
    assert {"val_loss", "val_i2t_r1", "val_i2t_r5", "val_t2i_r1", "val_t2i_r5"} <= set(metrics)
    # the logged values, not a range: recall and loss recomputed from the trained model over the validation split
    task = cli.model
    assert isinstance(task, CaptionFinetuneTask)
    task.eval()
    images, texts, captions, losses = [], [], [], []
    with torch.no_grad():
        for batch in islice(cli.datamodule.val_dataloader(), int(cli.trainer.limit_val_batches)):  # 2 in the config
            image, text = task.embed(batch)
            images.append(image)
            texts.append(text)
            captions += batch["caption"]
            losses.append((float(task.criterion(image, text, task.logit_scale())), len(image)))
    expected = retrieval_recall(torch.cat(images) @ torch.cat(texts).T, captions)
    for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"):
        assert float(metrics[f"val_{key}"]) == pytest.approx(expected[key], abs=1e-7), key
    loss = sum(v * n for v, n in losses) / sum(n for _, n in losses)
    assert float(metrics["val_loss"]) == pytest.approx(loss, rel=1e-5)
    best, last = run / "adapters" / "best.safetensors", run / "adapters" / "last.safetensors"
    assert best.is_file() and last.is_file() and not (run / "adapters" / "text_best.safetensors").exists()
    meta = read_adapter_metadata(best)
    assert meta["adapter"] == "mona" and len(meta["targets"]) == 4  # every block of the 4-block tiny tower
    assert all(t.startswith("visual.") for t in meta["targets"])
    saved = load_file(best)
    own = task.encoder.adapter_state_dict()
    assert set(saved) == set(own)  # visual adapters only; with one validation, best == last == the trained state
    assert all(torch.equal(saved[k], own[k]) for k in saved)

    # segmentation reading blocks 0 and 1: the encoder prunes blocks 2-3, whose adapters are skipped on load
    seg = main(
        [
            "fit",
            *_args(SEG_CONF, tmp_path, "seg"),
            "--model.init_args.layers=[0,1]",
            f"--model.init_args.adapter_checkpoint={best}",
        ]
    )
    assert seg.trainer.state.finished
    fresh = SegmentationTask(**{**TINY, "layers": [0, 1]}, adapter_checkpoint=str(best))
    loaded = fresh.encoder.adapter_state_dict()
    assert loaded and set(loaded) < set(saved)
    assert all(".resblocks.0." in k or ".resblocks.1." in k for k in loaded)
    assert all(torch.equal(loaded[k], saved[k]) for k in loaded)
    # type and placement mismatches stay errors
    with pytest.raises(ValueError, match="holds 'mona' adapters"):
        CLIPEncoder(**{**TINY, "layers": [0, 1]}, adapter="lora", adapter_checkpoint=str(best))
    with pytest.raises(ValueError, match="adapts other modules"):
        CLIPEncoder(**TINY, adapter="mona", adapter_kwargs={"blocks": [0]}, adapter_checkpoint=str(best))
    with pytest.raises(ValueError, match="model_name"):
        CLIPEncoder("usclip-demo-vit", layers=[1], adapter="mona", adapter_checkpoint=str(best))


def test_checkpoints_without_backbone_keep_both_names_of_trained_tensors():
    task = _task(text_adapter="lora", text_adapter_kwargs={"r": 2})
    frozen = task._frozen_keys()
    state = task.state_dict()
    # keep_text lists the visual tower twice (encoder.visual, encoder.text_model.visual); neither copy of a
    # trained adapter may count as frozen, or a checkpoint would refill it from the fresh model on load
    assert any(k.startswith("encoder.text_model.visual.") and "mona" in k for k in state)
    assert not any("mona" in k or "lora_" in k or k.endswith("logit_scale") for k in frozen)
    assert "encoder.text_model.token_embedding.weight" in frozen and "encoder.visual.conv1.weight" in frozen
