"""Baseline overlays (configs/baselines/*.yaml) composed after the paper configs resolve to what the overlay names.

Composing ``--config configs/busi_seg.yaml --config configs/baselines/<x>.yaml`` keeps every key the overlay leaves
out, so an overlay that forgets ``adapter`` trains the paper config's Mona on a "frozen baseline" row. Each overlay
is composed after every paper config of the task(s) it fits, with the real CLI parser (no weights load), and the
resolved model arguments must equal the overlay's. New overlays (e.g. clipseg.yaml) are picked up automatically.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import pytest
import yaml
from open_clip.transformer import QuickGELU
from torch import nn

from usclip.cli import main
from usclip.models import CLIPEncoder, PretrainedWeightsError

CONFIG_DIR = Path(__file__).parents[1] / "configs"
OVERLAYS = sorted((CONFIG_DIR / "baselines").glob("*.yaml"))
#: the paper configs, by task (demo.yaml and the caption config are not baselines' bases)
PAPER = {
    "segmentation": [*sorted(CONFIG_DIR.glob("*_seg.yaml")), CONFIG_DIR / "ln2_test.yaml"],
    "classification": sorted(CONFIG_DIR.glob("*_cls.yaml")),
}
#: what every baseline overlay must write out, whatever the base config says
NAMED = ("model_name", "pretrained", "adapter", "head")
CLIP_VARIANTS = ("biomedclip", "metaclip", "unimedclip")
#: baselines with a second overlay that runs them as the authors did (<name>_authors.yaml)
AUTHORS_BASELINES = ("dinov2", "unet", "resnet18")


def _init_args(overlay: Path) -> dict[str, Any]:
    return yaml.safe_load(overlay.read_text())["model"]["init_args"]


def _tasks(overlay: Path) -> list[str]:
    """The tasks an overlay fits, read from the overlay itself.

    A ``class_path`` names the task; a native model fits one task by its library (``timm:`` classifiers,
    ``smp:`` and CLIPSeg segmenters); an encoder under the paper's head fits both.
    """
    model = yaml.safe_load(overlay.read_text())["model"]
    if "class_path" in model:
        return ["classification" if "Classification" in model["class_path"] else "segmentation"]
    init = model["init_args"]
    if init.get("head") == "native" and not str(init["model_name"]).startswith("dinov2:"):  # DINOv2: both tasks
        return ["classification" if str(init["model_name"]).startswith("timm:") else "segmentation"]
    return ["segmentation", "classification"]


def _is_open_clip(init: dict[str, Any]) -> bool:
    return init.get("head") == "paper" and not str(init["model_name"]).startswith("timm:")


CASES = [(overlay, base) for overlay in OVERLAYS for task in _tasks(overlay) for base in PAPER[task]]
#: one parse costs about a second on a shared CPU: the default suite composes each overlay after the first paper
#: config of each task (busi_seg, busi_cls); the other bases run with -m slow. The bases of one task share the
#: class_path, so the merge is the same; the slow run checks it rather than assumes it.
FIRST = {task: bases[0] for task, bases in PAPER.items()}
CASE_PARAMS = [
    pytest.param(o, b, id=f"{b.stem}+{o.stem}", marks=() if b in FIRST.values() else pytest.mark.slow) for o, b in CASES
]


def _resolve_all(parser: Any, base: Path, overlay: Path) -> dict[str, Any]:
    return parser.parse_args(["fit", "--config", str(base), "--config", str(overlay)]).fit.as_dict()


def _resolve(parser: Any, base: Path, overlay: Path) -> dict[str, Any]:
    return _resolve_all(parser, base, overlay)["model"]["init_args"]


def test_the_cases_cover_every_overlay_and_paper_config():
    assert {o.stem for o in OVERLAYS} >= {*CLIP_VARIANTS, *(f"{v}_mona" for v in CLIP_VARIANTS), "unet", "resnet18"}
    assert {o.stem for o in OVERLAYS} >= {f"{b}_authors" for b in AUTHORS_BASELINES}
    assert _tasks(CONFIG_DIR / "baselines" / "dinov2_authors.yaml") == ["segmentation", "classification"]
    assert {b for _, b in CASES} == {*PAPER["segmentation"], *PAPER["classification"]}
    assert len(PAPER["segmentation"]) >= 5 and len(PAPER["classification"]) >= 2
    for bases in PAPER.values():  # why one base per task suffices in the default suite
        paths = {yaml.safe_load(b.read_text())["model"]["class_path"] for b in bases}
        assert len(paths) == 1, paths


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[o.stem for o in OVERLAYS])
def test_overlay_names_adapter_weights_head_and_activation(overlay: Path):
    init = _init_args(overlay)
    assert set(NAMED) <= set(init), f"{overlay.name} leaves {set(NAMED) - set(init)} to the base config"
    assert "logger" not in yaml.safe_load(overlay.read_text()).get("trainer", {}), "the dataset config names runs"
    if _is_open_clip(init):
        assert "quick_gelu" in init, f"{overlay.name} leaves quick_gelu to the base config"
    if overlay.stem in CLIP_VARIANTS:
        assert init["adapter"] is None and init["head"] == "paper"
    if overlay.stem.endswith("_mona"):
        assert init["adapter"] == "mona" and init["head"] == "paper"
        frozen = _init_args(overlay.with_name(overlay.name.replace("_mona", "")))
        assert {k: v for k, v in init.items() if k != "adapter"} == {k: v for k, v in frozen.items() if k != "adapter"}
    if init["head"] == "native":
        assert init["adapter"] is None


@pytest.mark.parametrize(("overlay", "base"), CASE_PARAMS)
def test_overlay_after_paper_config_resolves_to_the_overlay(fit_parser: Any, overlay: Path, base: Path):
    base_init = yaml.safe_load(base.read_text())["model"]["init_args"]
    assert base_init["adapter"] == "mona"  # what a forgotten key would silently keep
    everything = _resolve_all(fit_parser, base, overlay)
    resolved = everything["model"]["init_args"]
    for key, value in _init_args(overlay).items():
        assert resolved[key] == value, f"{base.name} + {overlay.name}: {key}={resolved[key]!r}, overlay says {value!r}"
    raw = yaml.safe_load(overlay.read_text())  # the data and trainer settings of an overlay win too
    for key, value in {**raw.get("data", {}).get("init_args", {}), **raw.get("trainer", {})}.items():
        got = everything["data"]["init_args"].get(key, everything["trainer"].get(key))
        assert got == value, f"{base.name} + {overlay.name}: {key}={got!r}, overlay says {value!r}"
    if "image_size" in raw.get("data", {}).get("init_args", {}):  # the model follows the data's image size
        assert resolved["image_size"] == raw["data"]["init_args"]["image_size"]


def test_print_config_shows_what_the_parser_resolves(fit_parser: Any):
    """The shared parser is the CLI's: ``usclip fit --print_config`` prints the same model arguments."""
    base, overlay = CONFIG_DIR / "busi_seg.yaml", CONFIG_DIR / "baselines" / "biomedclip.yaml"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", "--print_config", "--config", str(base), "--config", str(overlay)])
    printed = yaml.safe_load(out.getvalue())["model"]["init_args"]
    assert printed["adapter"] is None and printed["pretrained"].startswith("hf-hub:microsoft/BiomedCLIP")
    resolved = _resolve(fit_parser, base, overlay)
    assert {k: printed[k] for k in (*NAMED, "quick_gelu")} == {k: resolved[k] for k in (*NAMED, "quick_gelu")}


# ----------------------------------------------------------------------------------------------- UniMedCLIP
def test_unimedclip_builds_with_quick_gelu():
    """The overlay's model_name and quick_gelu give QuickGELU in every block (random weights: nothing to fetch)."""
    init = _init_args(CONFIG_DIR / "baselines" / "unimedclip.yaml")
    assert init["model_name"] == "ViT-B-16-quickgelu" and init["quick_gelu"] is True
    enc = CLIPEncoder(init["model_name"], pretrained=None, quick_gelu=init["quick_gelu"], layers=[0])
    blocks = enc.visual.transformer.resblocks
    assert len(blocks) == 1 and isinstance(blocks[0].mlp.gelu, QuickGELU)
    assert enc.encoder_config["quick_gelu"] is True
    # control: a GELU config with quick_gelu null keeps nn.GELU, so the check above can fail
    plain = CLIPEncoder("usclip-test-vit", pretrained=None, quick_gelu=None, layers=[0])
    assert type(plain.visual.transformer.resblocks[0].mlp.gelu) is nn.GELU


@pytest.mark.parametrize("name", ["unimedclip", "unimedclip_mona"])
def test_unimedclip_without_its_file_says_where_to_download_it(name: str, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    init = _init_args(CONFIG_DIR / "baselines" / f"{name}.yaml")
    with pytest.raises(PretrainedWeightsError) as err:
        CLIPEncoder(init["model_name"], pretrained=init["pretrained"], quick_gelu=True, layers=[0])
    msg = str(err.value)
    assert f"pretrained={init['pretrained']!r} does not exist" in msg
    assert str(tmp_path / init["pretrained"]) in msg  # where it looked
    assert "github.com/mbzuai-oryx/UniMed-CLIP" in msg and "unimed_clip_vit_b16.pt" in msg
    assert ".safetensors" in msg and "state dict" in msg  # the expected format
