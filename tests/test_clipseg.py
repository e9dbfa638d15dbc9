"""CLIPSeg (transformers) as a native segmentation baseline: a tiny random CLIPSeg built from a shipped config."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from open_clip.tokenizer import SimpleTokenizer
from torch.nn import functional as F

from usclip.cli import main
from usclip.models.baselines import build_native_model
from usclip.models.clipseg import (
    CLIPSEG_MEAN,
    ORGAN_PROMPTS,
    CLIPSegNet,
    build_clipseg,
    resolve_prompt,
)
from usclip.tasks import SegmentationTask

TINY = "usclip-test-clipseg"  # usclip/models/model_configs/usclip-test-clipseg.json: 64 px, 16 px patches
CONF = Path(__file__).parent / "conf" / "segmentation_clipseg.yaml"
TOL = {"rtol": 1e-4, "atol": 5e-4}
OVERLAY = Path(__file__).parents[1] / "configs" / "baselines" / "clipseg.yaml"


@pytest.fixture(scope="module")
def net() -> CLIPSegNet:
    torch.manual_seed(0)
    model, _, _ = build_clipseg(TINY, None, "busi", 64)
    return model.eval()


def _foreground(net: CLIPSegNet, x: torch.Tensor) -> torch.Tensor:
    """The decoder's foreground logit (B, h, w), called the way transformers documents it."""
    ids = net.input_ids.expand(x.shape[0], -1)
    return net.model(input_ids=ids, pixel_values=x).logits.reshape(x.shape[0], *x.shape[-2:])


def test_logits_are_plus_minus_foreground_at_the_model_size(net):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, fg = net(x), _foreground(net, x)
    assert out.shape == (2, 2, 64, 64)
    # channel 1 is the lesion, channel 0 its negation (the authors' two-class logits); no resize at the model size
    # the prompt embedding is computed once per batch, not per image: float noise only (logits are ~10-20 here)
    torch.testing.assert_close(out[:, 1], fg, **TOL)
    torch.testing.assert_close(out[:, 0], -fg, **TOL)


def test_non_square_image_resized_in_and_logits_resized_back(net):
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        out = net(x)
        fg = _foreground(net, F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False))
    assert out.shape == (2, 2, 48, 80)
    expected = F.interpolate(fg.unsqueeze(1), size=(48, 80), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(out[:, 1], expected, **TOL)


def test_other_model_size_interpolates_position_embeddings():
    torch.manual_seed(0)
    model, _, _ = build_clipseg(TINY, None, "busi", 96)  # the config's position embeddings are for 64 px
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        out = model.eval()(x)
    assert out.shape == (1, 2, 96, 96)  # 6x6 patch grid, decoder output 96 px: no resize back needed
    torch.testing.assert_close(out[:, 1], _foreground(model, x), **TOL)


def test_prompt_is_the_authors_text_tokenised_once(net):
    assert resolve_prompt("busi") == resolve_prompt("BREAST") == ORGAN_PROMPTS["breast"]
    assert resolve_prompt("ddti") == resolve_prompt("tn3k") == ORGAN_PROMPTS["thyroid"]
    assert resolve_prompt("a hypoechoic nodule") == "a hypoechoic nodule"
    assert net.input_ids.shape == (1, 77)
    expected = SimpleTokenizer()([ORGAN_PROMPTS["breast"]], context_length=77)
    torch.testing.assert_close(net.input_ids, expected)
    n = int((expected != 0).sum())
    assert expected[0, 0] == 49406 and expected[0, n - 1] == 49407 and n == 68  # start, end, no truncation
    assert "input_ids" not in net.state_dict()  # the prompt comes from the configuration, not the checkpoint


def test_prompt_changes_the_output(net):
    other = CLIPSegNet(net.model, "ddti", 64).eval()  # same weights, thyroid prompt
    same = CLIPSegNet(net.model, "breast", 64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        base = net(x)
        assert (base - other(x)).abs().max() > 1e-3
        torch.testing.assert_close(base, same(x))


def test_only_the_decoder_trains():
    torch.manual_seed(0)
    task = SegmentationTask(
        model_name=f"clipseg:{TINY}", head="native", image_size=64, text_prompt="busi", pretrained=None
    )
    model = task.net.model
    assert all(not p.requires_grad for p in model.clip.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
    trainable = {id(p) for p in task.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.decoder.parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-3)
    x, mask = torch.rand(2, 3, 64, 64), (torch.rand(2, 64, 64) > 0.7).long()
    task._loss(task(x), mask).backward()
    opt.step()
    after = model.state_dict()
    clip_keys = [k for k in before if k.startswith("clip.")]
    decoder_keys = [k for k in before if k.startswith("decoder.")]
    assert clip_keys and all(torch.equal(before[k], after[k]) for k in clip_keys)
    changed = [k for k in decoder_keys if not torch.equal(before[k], after[k])]
    assert len(changed) == len(decoder_keys)  # every decoder tensor moved (FiLM, reduces, layers, transposed convs)


def test_local_folder_and_weights_file(tmp_path, net):
    folder = tmp_path / "clipseg"
    net.model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [1, 2, 3]})
    )
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = net(x)
    reference = net.model.state_dict()
    loaded, mean, std = build_clipseg("", str(folder), "busi", 64)  # model_name: clipseg + pretrained: folder
    assert mean == (0.1, 0.2, 0.3) and std == (1, 2, 3)  # the checkpoint's own processor statistics
    assert all(torch.equal(v, reference[k]) for k, v in loaded.model.state_dict().items())
    with torch.no_grad():  # from_pretrained may pick another attention kernel: float noise only
        torch.testing.assert_close(loaded.eval()(x), expected, **TOL)
    loaded, mean, _ = build_clipseg(TINY, str(folder / "model.safetensors"), "busi", 64)
    assert mean == CLIPSEG_MEAN
    assert all(torch.equal(v, reference[k]) for k, v in loaded.model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), expected, **TOL)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: build_clipseg(TINY, None, None, 64), ValueError, r"CLIPSeg needs text_prompt.*busi.*got None"),
        (lambda: build_clipseg(TINY, None, "a " * 80, 64), ValueError, r"needs 82 CLIP tokens.*takes 77"),
        (
            lambda: build_clipseg("usclip-tests/no-such-clipseg", "usclip-tests/no-such-clipseg", "busi", 64),
            OSError,
            r"cannot load CLIPSeg 'usclip-tests/no-such-clipseg'.*hf download usclip-tests/no-such-clipseg.*folder",
        ),
        (
            lambda: build_clipseg("CIDAS/clipseg-rd64-refined", "other-org/clipseg", "busi", 64),
            ValueError,
            r"name different CLIPSeg checkpoints",
        ),
        (
            lambda: build_native_model("segmentation", "smp:Unet/resnet18", 2, None, 64, "busi"),
            ValueError,
            r"text_prompt is for model_name='clipseg",
        ),
        (
            lambda: build_native_model("segmentation", f"clipseg:{TINY}", 3, None, 64, "busi"),
            ValueError,
            r"num_classes must be 2, got 3",
        ),
        (
            lambda: SegmentationTask(model_name="ViT-B-16", image_size=64, text_prompt="busi"),
            ValueError,
            r"text_prompt is for CLIPSeg.*'ViT-B-16' takes no prompt",
        ),
    ],
    ids=["no-prompt", "too-long", "offline-missing", "two-sources", "unet-prompt", "three-classes", "paper-head"],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_overlay_names_the_authors_checkpoint():
    init = yaml.safe_load(OVERLAY.read_text())["model"]["init_args"]
    assert init["model_name"] == "clipseg:CIDAS/clipseg-rd64-refined"
    assert init["pretrained"] == "CIDAS/clipseg-rd64-refined"
    assert init["adapter"] is None and init["head"] == "native"
    assert "text_prompt" in init and init["text_prompt"] is None  # must be named per dataset, never defaulted


def _args(tmp_path: Path) -> list[str]:
    return [
        "--config",
        str(CONF),
        f"--data.init_args.root={tmp_path / 'data'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        f"--trainer.default_root_dir={tmp_path}",
    ]


def test_cli_fit_then_test(tmp_path):
    initial = main(_args(tmp_path), run=False).model.net.model.state_dict()  # same seed -> same initial weights
    cli = main(["fit", *_args(tmp_path)])
    best = Path(cli.trainer.log_dir) / "checkpoints" / "best.ckpt"
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    trained = {k.removeprefix("net.model."): v for k, v in state.items()}
    assert all(torch.equal(trained[k], v) for k, v in initial.items() if k.startswith("clip."))
    assert any(not torch.equal(trained[k], v) for k, v in initial.items() if k.startswith("decoder."))

    cli = main(["test", *_args(tmp_path), f"--ckpt_path={best}"])
    results = Path(cli.trainer.log_dir) / "results"
    metrics = json.loads((results / "test_metrics.json").read_text())
    assert {"dice", "iou", "hd95", "asd", "num_images"} <= set(metrics)
    with (results / "test_per_image.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["num_images"] > 0
    assert sum(float(r["dice"]) for r in rows) / len(rows) == pytest.approx(metrics["dice"], abs=1e-5)
