"""LoRA switches (issue #15, item 4): scaling rule, output projection, dropout, the authors' reference config.

Every case uses r=4, alpha=12, so alpha/r = 3 and alpha/sqrt(r) = 6: a scale left out (1), inverted (r/alpha)
or computed by the other rule gives another number, and the tests compare against ``B @ A * scale`` built by hand.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import usclip.models  # noqa: F401  (registers usclip-test-vit)
from usclip.adapters import (
    LoraConfig,
    LoraLinear,
    LoraMultiheadAttention,
    LoraQkvLinear,
    inject_adapters,
    load_adapters,
    merge_adapters,
    read_adapter_metadata,
    save_adapters,
    unmerge_adapters,
)
from usclip.cli import main
from usclip.models import CLIPEncoder
from usclip.tasks import CaptionFinetuneTask, SegmentationTask

ROOT = Path(__file__).resolve().parents[1]
TINY = "usclip-test-vit"
R, ALPHA = 4, 12.0
#: the scale each rule must give for r=4, alpha=12, written out by hand
HAND_SCALE = {"alpha/r": 3.0, "alpha/sqrt(r)": 6.0}
SCALINGS = list(HAND_SCALE)
TARGETS = [("q", "k", "v"), ("q", "k", "v", "out")]
DROPOUTS = [0.0, 0.1]
COMBOS = list(itertools.product(SCALINGS, TARGETS, DROPOUTS))
COMBO_IDS = [f"{s}-{'+'.join(t)}-p{p}" for s, t, p in COMBOS]
#: fp32 tolerance of merged vs unmerged outputs (values O(1); merging reorders sums, ~1e-7 relative)
OUT_TOL = 1e-5
#: fp32 tolerance of weights after merge/unmerge (entries O(0.1-1); one add and one subtract)
WEIGHT_TOL = 1e-6


def _config(scaling: str, targets: tuple[str, ...] = ("q", "k", "v"), dropout: float = 0.0, **kw) -> LoraConfig:
    return LoraConfig(r=R, alpha=ALPHA, scaling=scaling, attn_targets=targets, dropout=dropout, **kw)


@torch.no_grad()
def _randomise_lora(module: nn.Module, seed: int = 3, std: float = 0.1) -> None:
    """Large random A and B (B starts at zero), so a wrong scale moves the output far beyond the tolerances."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if "lora_" in name:
            p.copy_(std * torch.randn(p.shape, generator=g))


def _hand_delta(layer: nn.Module, t: str, scale: float) -> torch.Tensor:
    """``scale * B @ A`` of projection ``t``, from the parameters, with the scale given by the test."""
    a = layer.lora_A[t] if isinstance(layer.lora_A, nn.ParameterDict) else layer.lora_A
    b = layer.lora_B[t] if isinstance(layer.lora_B, nn.ParameterDict) else layer.lora_B
    return scale * (b.detach() @ a.detach())


@torch.no_grad()
def _reference_with_deltas(frozen: nn.Module, adapted: nn.Module, scale: float) -> nn.Module:
    """A plain copy of ``frozen`` whose attention weights carry the hand-computed LoRA updates of ``adapted``."""
    ref = copy.deepcopy(frozen)
    for name, layer in adapted.named_modules():
        if not isinstance(layer, LoraMultiheadAttention):
            continue
        mha = ref.get_submodule(name)
        assert isinstance(mha, nn.MultiheadAttention) and not isinstance(mha, LoraMultiheadAttention)
        d = mha.embed_dim
        for i, t in enumerate("qkv"):
            if t in layer.targets:
                mha.in_proj_weight[i * d : (i + 1) * d] += _hand_delta(layer, t, scale)
        if "out" in layer.targets:
            mha.out_proj.weight += _hand_delta(layer, "out", scale)
    return ref


def _attn_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone()
        for n, p in module.named_parameters()
        if n.endswith(("in_proj_weight", "out_proj.weight")) and "lora_" not in n
    }


# ----------------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(("scaling", "expected"), HAND_SCALE.items())
def test_scale_follows_the_rule(scaling, expected):
    assert _config(scaling).scale == expected
    assert LoraConfig(r=16, alpha=32.0, scaling=scaling).scale == {"alpha/r": 2.0, "alpha/sqrt(r)": 8.0}[scaling]


def test_default_is_the_lora_papers_rule_with_scale_one():
    cfg = LoraConfig()
    assert (cfg.r, cfg.alpha, cfg.scaling, cfg.dropout, cfg.attn_targets) == (16, 16.0, "alpha/r", 0.0, ("q", "k", "v"))
    assert cfg.scale == 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scaling": "rslora"}, r"scaling='rslora' must be one of \('alpha/r', 'alpha/sqrt\(r\)'\)"),
        ({"scaling": "alpha/sqrt r"}, r"scaling='alpha/sqrt r' must be one of"),
        ({"alpha": 0}, r"alpha=0 must be a number > 0"),
        ({"alpha": "32"}, r"alpha='32' must be a number > 0"),
        ({"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
        ({"attn_targets": ["q", "o"]}, r"attn_targets=\('q', 'o'\) must be .* \('q', 'k', 'v', 'out'\)"),
    ],
)
def test_bad_switch_values_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


# ----------------------------------------------------------------------------------------------- init and order
def test_init_a_kaiming_uniform_b_zero():
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (Kaiming-uniform with a=sqrt(5), as peft and the authors' code), B = 0, for every
    pair of every wrapper. Catches Kaiming's default gain (bound sqrt(6/in), 2.4x wider) and a non-zero B."""
    torch.manual_seed(0)
    layers = [
        LoraLinear(nn.Linear(256, 40), _config("alpha/r")),
        LoraQkvLinear(nn.Linear(256, 3 * 256), _config("alpha/r")),
        LoraMultiheadAttention(nn.MultiheadAttention(256, 4), _config("alpha/r", ("q", "k", "v", "out"))),
    ]
    for layer in layers:
        pairs = (
            [(layer.lora_A, layer.lora_B)]
            if isinstance(layer, LoraLinear)
            else [(layer.lora_A[t], layer.lora_B[t]) for t in layer.targets]
        )
        for a, b in pairs:
            bound = 1 / math.sqrt(a.shape[1])  # in_features = 256 everywhere (the q/k/v width for "out")
            assert a.shape[0] == R and not b.any() and b.shape[1] == R
            assert 0.95 * bound < a.abs().max() <= bound
            assert abs(a.std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)  # uniform, not normal


def test_targets_in_any_order_adapt_the_named_projections():
    """``attn_targets`` in any order means the same projections: ('v', 'q') adapts q with q's pair and v with v's.
    Catches the user's order kept (v's A multiplied by q's B in the fused low-rank product)."""
    assert _config("alpha/r", ("v", "out", "q")).attn_targets == ("q", "v", "out")
    torch.manual_seed(0)
    base = nn.Linear(16, 48)
    layer = LoraQkvLinear(copy.deepcopy(base), _config("alpha/r", ("v", "q"))).eval()
    _randomise_lora(layer)
    want = base.weight.detach().clone()
    want[:16] += _hand_delta(layer, "q", 3.0)
    want[32:] += _hand_delta(layer, "v", 3.0)
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, want, base.bias), atol=OUT_TOL, rtol=0)


# ----------------------------------------------------------------------------------------------- the scale, by hand
@pytest.mark.parametrize("scaling", SCALINGS)
def test_linear_delta_and_merge_use_the_hand_scale(scaling):
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    layer = LoraLinear(copy.deepcopy(base), _config(scaling)).eval()
    _randomise_lora(layer)
    x = torch.randn(3, 7, 24)
    delta = _hand_delta(layer, "", HAND_SCALE[scaling])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x) + x @ delta.T, atol=OUT_TOL, rtol=0)
        merge_adapters(layer)
        torch.testing.assert_close(layer.base_layer.weight, base.weight + delta, atol=WEIGHT_TOL, rtol=0)
        torch.testing.assert_close(layer(x), base(x) + x @ delta.T, atol=OUT_TOL, rtol=0)
        unmerge_adapters(layer)
        torch.testing.assert_close(layer.base_layer.weight, base.weight, atol=WEIGHT_TOL, rtol=0)


@pytest.mark.parametrize("scaling", SCALINGS)
def test_fused_qkv_delta_and_merge_use_the_hand_scale(scaling):
    """timm's fused ``attn.qkv``: one pair per slice, each scaled by the rule."""
    torch.manual_seed(0)
    base = nn.Linear(16, 3 * 16)
    layer = LoraQkvLinear(copy.deepcopy(base), _config(scaling, ("q", "v"))).eval()
    _randomise_lora(layer)
    scale = HAND_SCALE[scaling]
    want = base.weight.detach().clone()
    want[:16] += _hand_delta(layer, "q", scale)
    want[32:] += _hand_delta(layer, "v", scale)
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, want, base.bias), atol=OUT_TOL, rtol=0)
        merge_adapters(layer)
        torch.testing.assert_close(layer.base_layer.weight, want, atol=WEIGHT_TOL, rtol=0)
        unmerge_adapters(layer)
        torch.testing.assert_close(layer.base_layer.weight, base.weight, atol=WEIGHT_TOL, rtol=0)


@pytest.mark.parametrize("scaling", SCALINGS)
def test_attention_merge_writes_the_hand_delta_into_each_projection(scaling):
    """The merged ``in_proj_weight`` slices and ``out_proj.weight`` are W + scale * B @ A, with scale by hand."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    layer = LoraMultiheadAttention(copy.deepcopy(mha), _config(scaling, ("q", "k", "v", "out"))).eval()
    _randomise_lora(layer)
    scale = HAND_SCALE[scaling]
    merge_adapters(layer)
    w = layer.base_layer.in_proj_weight.detach()
    for i, t in enumerate("qkv"):
        want = mha.in_proj_weight[i * 32 : (i + 1) * 32].detach() + _hand_delta(layer, t, scale)
        torch.testing.assert_close(w[i * 32 : (i + 1) * 32], want, atol=WEIGHT_TOL, rtol=0)
    want_out = mha.out_proj.weight.detach() + _hand_delta(layer, "out", scale)
    torch.testing.assert_close(layer.base_layer.out_proj.weight.detach(), want_out, atol=WEIGHT_TOL, rtol=0)


# ----------------------------------------------------------------------------------------------- merge / unmerge
@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _vision(kwargs=None, **kw):
    torch.manual_seed(0)  # same backbone every time; adapters are drawn after it
    return CLIPEncoder(TINY, layers=(1, 3), adapter="lora" if kwargs is not None else None, adapter_kwargs=kwargs, **kw)


@pytest.mark.parametrize(("scaling", "targets", "dropout"), COMBOS, ids=COMBO_IDS)
def test_vision_merge_unmerge_exact(scaling, targets, dropout, images):
    """open_clip vision tower (FastMultiheadAttention, batch-first fast path); dropout is the identity in eval."""
    frozen = _vision().eval()
    enc = _vision({"r": R, "alpha": ALPHA, "scaling": scaling, "attn_targets": targets, "dropout": dropout}).eval()
    _randomise_lora(enc)
    ref = _reference_with_deltas(frozen, enc, HAND_SCALE[scaling]).eval()
    before = _attn_weights(enc)
    with torch.no_grad():
        want = ref(images)
        assert max((w - f).abs().max().item() for w, f in zip(want, frozen(images), strict=True)) > 1e-2
        unmerged = enc(images)
        for u, w in zip(unmerged, want, strict=True):
            torch.testing.assert_close(u, w, atol=OUT_TOL, rtol=0)
        merge_adapters(enc)
        for m, w in zip(enc(images), want, strict=True):
            torch.testing.assert_close(m, w, atol=OUT_TOL, rtol=0)
        unmerge_adapters(enc)
        for u2, u in zip(enc(images), unmerged, strict=True):
            torch.testing.assert_close(u2, u, atol=OUT_TOL, rtol=0)
    for n, w in _attn_weights(enc).items():
        torch.testing.assert_close(w, before[n], atol=WEIGHT_TOL, rtol=0)


@pytest.fixture(scope="module")
def text_model():
    torch.manual_seed(0)
    return open_clip.create_model(TINY).eval()


@pytest.mark.parametrize(("scaling", "targets", "dropout"), COMBOS, ids=COMBO_IDS)
def test_text_merge_unmerge_exact(scaling, targets, dropout, text_model):
    """Text tower: nn.MultiheadAttention called with the causal mask (the wrapper's masked, sequence-first path)."""
    clip = copy.deepcopy(text_model)
    inject_adapters(clip.transformer, _config(scaling, targets, dropout))
    clip.eval()
    _randomise_lora(clip.transformer)
    ref = copy.deepcopy(text_model)
    ref.transformer = _reference_with_deltas(text_model.transformer, clip.transformer, HAND_SCALE[scaling])
    tokens = open_clip.get_tokenizer(TINY)(["a hypoechoic mass", "benign lesion with smooth margins"])
    before = _attn_weights(clip.transformer)
    with torch.no_grad():
        want = ref.encode_text(tokens)
        assert (want - text_model.encode_text(tokens)).abs().max() > 1e-2
        unmerged = clip.encode_text(tokens)
        torch.testing.assert_close(unmerged, want, atol=OUT_TOL, rtol=0)
        merge_adapters(clip.transformer)
        torch.testing.assert_close(clip.encode_text(tokens), want, atol=OUT_TOL, rtol=0)
        unmerge_adapters(clip.transformer)
        torch.testing.assert_close(clip.encode_text(tokens), unmerged, atol=OUT_TOL, rtol=0)
    for n, w in _attn_weights(clip.transformer).items():
        torch.testing.assert_close(w, before[n], atol=WEIGHT_TOL, rtol=0)


def test_out_target_adapts_out_proj_of_every_attention_block():
    enc = _vision({"r": R, "alpha": ALPHA, "attn_targets": ["q", "k", "v", "out"]})
    layers = [m for m in enc.modules() if isinstance(m, LoraMultiheadAttention)]
    assert len(layers) == 4
    for m in layers:
        assert set(m.lora_A) == {"q", "k", "v", "out"}
        assert m.lora_A["out"].shape == (R, 64) and m.lora_B["out"].shape == (64, R)
    # q/k/v/out: 4 pairs of (4 x 64 + 64 x 4) per block
    assert sum(p.numel() for p in enc.parameters() if p.requires_grad) == 4 * 4 * 2 * R * 64


# ----------------------------------------------------------------------------------------------- dropout
def test_linear_dropout_only_on_the_lora_branch_in_training():
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    layer = LoraLinear(copy.deepcopy(base), _config("alpha/sqrt(r)", dropout=0.5))
    x = torch.randn(6, 24)
    layer.train()
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))  # B = 0: the frozen path sees no dropout
        _randomise_lora(layer)
        delta = HAND_SCALE["alpha/sqrt(r)"] * (layer.lora_B @ layer.lora_A)
        torch.manual_seed(7)
        got = layer(x)
        torch.manual_seed(7)
        dropped = F.dropout(x, 0.5, training=True)  # the same mask
        assert (dropped == 0).any()
        torch.testing.assert_close(got, base(x) + dropped @ delta.T, atol=OUT_TOL, rtol=0)
        layer.eval()
        torch.testing.assert_close(layer(x), base(x) + x @ delta.T, atol=OUT_TOL, rtol=0)
        assert torch.equal(layer(x), layer(x))


def test_fused_qkv_dropout_draws_one_mask_per_projection():
    """q, k and v get independent masks (drawn in that order), as separate LoRA layers would in the authors' code."""
    torch.manual_seed(0)
    base = nn.Linear(16, 48)
    layer = LoraQkvLinear(copy.deepcopy(base), _config("alpha/r", dropout=0.5)).train()
    _randomise_lora(layer)
    x = torch.randn(8, 16)
    with torch.no_grad():
        torch.manual_seed(11)
        got = layer(x)
        torch.manual_seed(11)
        masks = [F.dropout(x, 0.5, training=True) for _ in "qkv"]
        assert not torch.equal(masks[0], masks[1])
        want = base(x) + torch.cat(
            [m @ _hand_delta(layer, t, HAND_SCALE["alpha/r"]).T for m, t in zip(masks, "qkv", strict=True)], dim=-1
        )
        torch.testing.assert_close(got, want, atol=OUT_TOL, rtol=0)


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_dropout_only_on_the_lora_branch_in_training(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).train()
    layer = LoraMultiheadAttention(copy.deepcopy(mha), _config("alpha/sqrt(r)", ("q", "k", "v", "out"), 0.5)).train()
    x = torch.randn((2, 5, 32) if batch_first else (5, 2, 32))
    with torch.no_grad():
        # B = 0: the frozen output (equal up to float reordering: GEMM blocking depends on the thread count)
        torch.testing.assert_close(
            layer(x, x, x, need_weights=False)[0], mha(x, x, x, need_weights=False)[0], atol=1e-6, rtol=0
        )
        _randomise_lora(layer)
        a, b = layer(x, x, x, need_weights=False)[0], layer(x, x, x, need_weights=False)[0]
        assert (a - b).abs().max() > 1e-3  # dropout is active in training
        layer.eval()
        ev = layer(x, x, x, need_weights=False)[0]
        assert torch.equal(ev, layer(x, x, x, need_weights=False)[0])
        ref = _reference_with_deltas(nn.ModuleDict({"attn": mha}), nn.ModuleDict({"attn": layer}), 6.0)
        torch.testing.assert_close(ev, ref["attn"].eval()(x, x, x, need_weights=False)[0], atol=OUT_TOL, rtol=0)


@pytest.mark.parametrize("batch_first", [True, False])
def test_out_projection_branch_has_its_own_dropout(batch_first):
    """With only ``out`` adapted, training outputs still vary from call to call (dropout on the output-projection
    branch, both code paths), and eval equals the hand-merged weights. Catches that branch skipping dropout."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first)
    layer = LoraMultiheadAttention(copy.deepcopy(mha), _config("alpha/r", ("out",), 0.5)).train()
    _randomise_lora(layer)
    x = torch.randn((2, 5, 32) if batch_first else (5, 2, 32))
    with torch.no_grad():
        a, b = layer(x, x, x, need_weights=False)[0], layer(x, x, x, need_weights=False)[0]
        assert (a - b).abs().max() > 1e-3
        ref = _reference_with_deltas(nn.ModuleDict({"attn": mha}), nn.ModuleDict({"attn": layer}), 3.0)["attn"].eval()
        torch.testing.assert_close(layer.eval()(x, x, x)[0], ref(x, x, x)[0], atol=OUT_TOL, rtol=0)


@pytest.mark.parametrize("batch_first", [True, False])
def test_trained_lora_attention_equals_mha_with_merged_weights(batch_first):
    """After training (non-zero A and B, trained q/k/v and output biases), the unmerged wrapper equals
    nn.MultiheadAttention whose weights carry the hand-computed updates, on every path: the batch-first fast path,
    the text tower's causal mask (bool and additive float, as open_clip passes it), a padding mask with per-head
    weights, and cross-attention. Catches a path that forgets the deltas or the scale, or drops a bias."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_(0.0, 0.5)
        mha.out_proj.bias.normal_(0.0, 0.5)
    layer = LoraMultiheadAttention(copy.deepcopy(mha), _config("alpha/sqrt(r)", ("q", "k", "v", "out"))).eval()
    _randomise_lora(layer)
    ref = _reference_with_deltas(nn.ModuleDict({"attn": mha}), nn.ModuleDict({"attn": layer}), 6.0)["attn"].eval()
    shape = (2, 5, 32) if batch_first else (5, 2, 32)
    x, kv = torch.randn(shape), torch.randn(shape)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    text_mask = torch.zeros(5, 5).masked_fill_(causal, float("-inf"))  # open_clip's build_causal_mask
    pad = torch.tensor([[False] * 4 + [True], [False] * 5])
    calls = [
        {"query": x, "key": x, "value": x, "need_weights": False},
        {"query": x, "key": x, "value": x, "attn_mask": causal, "need_weights": False},
        {"query": x, "key": x, "value": x, "attn_mask": text_mask, "need_weights": False},
        {"query": x, "key": x, "value": x, "attn_mask": causal, "need_weights": True},
        {"query": x, "key": x, "value": x, "key_padding_mask": pad, "average_attn_weights": False},
        {"query": x, "key": kv, "value": kv, "need_weights": True},
    ]
    with torch.no_grad():
        assert (ref(x, x, x)[0] - mha(x, x, x)[0]).abs().max() > 1e-1  # the updates are far above the tolerance
        for call in calls:
            want, want_w = ref(**call)
            got, got_w = layer(**call)
            torch.testing.assert_close(got, want, atol=OUT_TOL, rtol=0)
            if call.get("need_weights", True):
                torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=0)
            else:
                assert got_w is None


# ----------------------------------------------------------------------------------------------- reference config
def _cli(configs: list[Path], tmp_path: Path):
    args = [a for c in configs for a in ("--config", str(c))]
    args += [f"--data.init_args.root={tmp_path / 'data'}", f"--trainer.default_root_dir={tmp_path}"]
    return main(args, run=False)


REFERENCE = ROOT / "configs" / "adapters" / "lora_reference.yaml"


@pytest.mark.parametrize("first", ["segmentation_lora", "segmentation_mona"])
def test_reference_config_resolves_to_the_authors_setting(first, tmp_path):
    """As a second --config after a tiny test config (a LoRA one, and a Mona one whose kwargs must not leak)."""
    cli = _cli([ROOT / "tests" / "conf" / f"{first}.yaml", REFERENCE], tmp_path)
    assert cli.model.encoder_args["adapter"] == "lora"
    cfg = cli.model.encoder.adapter_config
    assert isinstance(cfg, LoraConfig)
    assert (cfg.r, cfg.alpha, cfg.scaling, cfg.dropout) == (16, 32.0, "alpha/sqrt(r)", 0.1)
    assert cfg.attn_targets == ("q", "k", "v", "out")
    assert cfg.scale == 8.0 == 32 / math.sqrt(16)
    layers = [m for m in cli.model.encoder.modules() if isinstance(m, LoraMultiheadAttention)]
    assert len(layers) == 4
    for m in layers:
        assert m.scale == 8.0 and set(m.lora_A) == {"q", "k", "v", "out"}
        assert isinstance(m.lora_dropout, nn.Dropout) and m.lora_dropout.p == 0.1


def test_default_lora_config_resolves_to_scale_one(tmp_path):
    default = ROOT / "configs" / "adapters" / "lora.yaml"
    cli = _cli([ROOT / "tests" / "conf" / "segmentation_mona.yaml", default], tmp_path)
    cfg = cli.model.encoder.adapter_config
    assert (cfg.r, cfg.alpha, cfg.scaling, cfg.dropout, cfg.attn_targets) == (16, 16.0, "alpha/r", 0.0, ("q", "k", "v"))
    assert cfg.scale == 1.0


# ----------------------------------------------------------------------------------------------- checkpoints
REFERENCE_KWARGS = {"r": R, "alpha": ALPHA, "scaling": "alpha/sqrt(r)", "dropout": 0.1, "attn_targets": TARGETS[1]}


def _strip_from_metadata(path: Path, dest: Path, *fields: str) -> None:
    """A copy of ``path`` whose metadata lacks ``fields`` (a file written before they existed)."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["usclip_adapters"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for field in fields:
        del meta["config"][field]
    save_file(tensors, str(dest), metadata={"usclip_adapters": json.dumps(meta)})


def test_file_records_the_switches_and_rebuilds_them(tmp_path, images):
    enc = _vision(REFERENCE_KWARGS).eval()
    _randomise_lora(enc)
    path = tmp_path / "ref.safetensors"
    save_adapters(enc, path)
    config = read_adapter_metadata(path)["config"]
    assert config["scaling"] == "alpha/sqrt(r)" and config["dropout"] == 0.1
    assert config["attn_targets"] == ["q", "k", "v", "out"]
    again = _vision(adapter_checkpoint=str(path)).eval()  # the file alone rebuilds the adapters
    assert again.adapter_config.scale == 6.0
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(enc(images), again(images), strict=True))


def test_file_without_scaling_loads_with_the_old_meaning(tmp_path, images):
    """Files written before ``scaling`` existed were alpha/r: they load as such, and rebuild as such."""
    enc = _vision({"r": R, "alpha": ALPHA}).eval()
    _randomise_lora(enc)
    new, old = tmp_path / "new.safetensors", tmp_path / "old.safetensors"
    save_adapters(enc, new)
    _strip_from_metadata(new, old, "scaling")
    with safe_open(str(old), framework="pt") as f:
        assert "scaling" not in json.loads(f.metadata()["usclip_adapters"])["config"]
    assert read_adapter_metadata(old)["config"]["scaling"] == "alpha/r"
    same = _vision({"r": R, "alpha": ALPHA})
    load_adapters(same, old)
    rebuilt = _vision(adapter_checkpoint=str(old)).eval()
    assert rebuilt.adapter_config.scaling == "alpha/r" and rebuilt.adapter_config.scale == 3.0
    with torch.no_grad():
        want = enc(images)
        for got in (same.eval()(images), rebuilt(images)):
            assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    with pytest.raises(ValueError, match=r"scaling='alpha/r' in the file but scaling='alpha/sqrt\(r\)' in the module"):
        load_adapters(_vision({"r": R, "alpha": ALPHA, "scaling": "alpha/sqrt(r)"}), old)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({**REFERENCE_KWARGS, "scaling": "alpha/r"}, r"scaling='alpha/sqrt\(r\)' in the file but scaling='alpha/r'"),
        ({**REFERENCE_KWARGS, "attn_targets": ["q", "k", "v"]}, r"attn_targets=\['q', 'k', 'v', 'out'\] in the file"),
        ({**REFERENCE_KWARGS, "alpha": 2 * ALPHA}, r"alpha=12.0 in the file but alpha=24.0"),
    ],
)
def test_switch_mismatch_is_a_clear_error(kwargs, match, tmp_path):
    path = tmp_path / "ref.safetensors"
    save_adapters(_vision(REFERENCE_KWARGS), path)
    with pytest.raises(ValueError, match=match):
        load_adapters(_vision(kwargs), path)


def test_dropout_is_not_structural(tmp_path, images):
    """Dropout changes training, not what the weights mean: a file loads into a module with another dropout."""
    enc = _vision(REFERENCE_KWARGS).eval()
    _randomise_lora(enc)
    path = tmp_path / "ref.safetensors"
    save_adapters(enc, path)
    other = _vision({**REFERENCE_KWARGS, "dropout": 0.0}).eval()
    load_adapters(other, path)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(enc(images), other(images), strict=True))


# ------------------------------------------------------------------------------- LoRA after caption tuning (#22)
def _lora_task(**kw) -> SegmentationTask:
    torch.manual_seed(0)  # the same random backbone and head every time; the LoRA tensors are drawn after them
    return SegmentationTask(
        model_name=TINY, pretrained=None, layers=[1, 3], image_size=64, embed_dim=16, num_classes=2, **kw
    )


def _train_step(task: SegmentationTask, images: torch.Tensor, mask: torch.Tensor) -> torch.optim.Optimizer:
    """One AdamW step as ``usclip fit`` takes it (``configure_optimizers``), in training mode; returns the optimiser."""
    task.trainer = SimpleNamespace(estimated_stepping_batches=10)  # what configure_optimizers reads
    opt = task.configure_optimizers()["optimizer"]
    for group in opt.param_groups:
        group["lr"] = 1e-2  # large, so that any tensor in the optimiser visibly moves
    task.train()
    opt.zero_grad()
    task._loss(task(images), mask).backward()
    opt.step()
    return opt


@pytest.fixture(scope="module")
def tuned_lora(tmp_path_factory) -> Path:
    """An adapter file as caption tuning leaves it: the authors' LoRA settings, A and B far from their init."""
    src = _lora_task(adapter="lora", adapter_kwargs=REFERENCE_KWARGS)
    _randomise_lora(src.encoder)
    path = tmp_path_factory.mktemp("tuned") / "lora.safetensors"
    save_adapters(src.encoder, path)
    return path


def test_frozen_adapter_stays_bit_identical_while_the_head_trains(tuned_lora, images):
    """``train_adapter: false``: the loaded LoRA is used as loaded, only the head is in the optimiser and moves.

    Catches: the switch ignored (LoRA trained, as usclip's default does), LoRA frozen by ``eval()`` instead of
    ``requires_grad`` (its dropout would stop acting, unlike the authors'), the head frozen along with it.
    """
    mask = (images[:, 0] > 0).long()
    task = _lora_task(
        adapter="lora", adapter_kwargs=REFERENCE_KWARGS, adapter_checkpoint=str(tuned_lora), train_adapter=False
    )
    loaded = {k: v.clone() for k, v in task.encoder.state_dict().items()}
    lora = {k for k in loaded if "lora_" in k}
    assert lora and all(loaded[k].abs().max() > 0 for k in lora)  # the tuned tensors, B included, not the init
    head = {n: p.detach().clone() for n, p in task.head.named_parameters()}

    opt = _train_step(task, images, mask)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in task.head.parameters()}
    after = task.encoder.state_dict()
    assert all(torch.equal(after[k], loaded[k]) for k in loaded)  # LoRA and backbone: bit for bit
    moved = [n for n, p in task.head.named_parameters() if not torch.equal(p.detach(), head[n])]
    assert moved and len(moved) == sum(p.grad is not None for p in task.head.parameters())

    # its dropout still acts in training mode (later:src/adapters/lora.py:82), and not in evaluation
    with torch.no_grad():
        torch.manual_seed(1)
        first = task.encoder(images)[-1]
        torch.manual_seed(2)
        assert not torch.allclose(first, task.encoder(images)[-1])
        task.eval()
        assert torch.equal(task.encoder(images)[-1], task.encoder(images)[-1])

    # usclip's default trains the same loaded LoRA
    trained = _lora_task(adapter="lora", adapter_kwargs=REFERENCE_KWARGS, adapter_checkpoint=str(tuned_lora))
    _train_step(trained, images, mask)
    state = trained.encoder.state_dict()
    assert all(not torch.equal(state[k], loaded[k]) for k in lora)


def test_untuned_frozen_lora_is_the_frozen_encoder(images):
    """The authors' "CLIP (LoRA)" row (configs/adapters/lora_authors.yaml): an untuned LoRA, frozen, changes nothing
    (B = 0), in training mode with its dropout too; only the head trains, as with no adapter."""
    plain = _lora_task(adapter=None)
    lora = _lora_task(adapter="lora", adapter_kwargs=REFERENCE_KWARGS, train_adapter=False)
    plain.train()
    lora.train()
    with torch.no_grad():
        for a, b in zip(plain.encoder(images), lora.encoder(images), strict=True):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == [
        n for n, p in plain.named_parameters() if p.requires_grad
    ]
    with pytest.raises(ValueError, match="train_adapter=False is for downstream tasks"):
        CaptionFinetuneTask(model_name=TINY, pretrained=None, adapter="mona", train_adapter=False)


def test_authors_lora_overlays_freeze_the_reference_lora(tmp_path):
    """configs/adapters/lora_authors.yaml and lora_ft_authors.yaml after a tiny task config: the authors' LoRA
    settings, frozen, only the head trainable; the "ft." one loads the caption run's file (exactly its tensors)."""
    args = ["--config", str(ROOT / "tests" / "conf" / "segmentation_mona.yaml")]
    args += [f"--data.init_args.root={tmp_path / 'data'}", f"--trainer.default_root_dir={tmp_path}"]
    tuned = tmp_path / "tuned.safetensors"
    for overlay in ("lora_authors", "lora_ft_authors"):
        extra = [f"--model.init_args.adapter_checkpoint={tuned}"] if overlay == "lora_ft_authors" else []
        config = ["--config", str(ROOT / "configs" / "adapters" / f"{overlay}.yaml")]
        task = main([*args, *config, *extra], run=False).model
        cfg = task.encoder.adapter_config
        assert task.hparams["train_adapter"] is False and isinstance(cfg, LoraConfig), overlay
        settings = (cfg.r, cfg.alpha, cfg.scaling, cfg.dropout, cfg.attn_targets)
        assert settings == (16, 32.0, "alpha/sqrt(r)", 0.1, TARGETS[1]), overlay
        trainable = {n for n, p in task.named_parameters() if p.requires_grad}
        assert trainable == {f"head.{n}" for n, _ in task.head.named_parameters()}, overlay
        lora = task.encoder.adapter_state_dict()
        if overlay == "lora_authors":
            assert all(not v.any() for k, v in lora.items() if "lora_B" in k)  # untuned: the identity
            _randomise_lora(task.encoder)
            save_adapters(task.encoder, tuned)
            expected = task.encoder.adapter_state_dict()
        else:
            assert lora.keys() == expected.keys() and all(torch.equal(lora[k], expected[k]) for k in lora)
