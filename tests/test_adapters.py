"""Adapter invariants (STYLE.md section 6): one CASES table, checked on the tiny encoder and on ViT-B-16."""

from __future__ import annotations

import copy
import inspect
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import usclip.models  # noqa: F401  (registers usclip-test-vit)
from usclip.adapters import (
    ADAPTERS,
    LoraConfig,
    LoraLinear,
    LoraMultiheadAttention,
    Mona,
    MonaBlock,
    MonaConfig,
    adapter_parameter_names,
    build_adapter_config,
    count_parameters,
    find_targets,
    inject_adapters,
    list_adapters,
    load_adapters,
    merge_adapters,
    parameter_report,
    read_adapter_metadata,
    save_adapters,
    unmerge_adapters,
)
from usclip.adapters._inject import block_index
from usclip.adapters.mona import OPEN_CLIP_BLOCK_ATTRS
from usclip.models import CLIPEncoder

TINY = "usclip-test-vit"
LAYERS = (1, 3)  # keeps all 4 blocks of the tiny tower

# (id, adapter, adapter_kwargs, wrapped modules, wrapper type, exact identity at init)
CASES = [
    ("lora-qkv", "lora", {}, 4, LoraMultiheadAttention, True),
    (
        "lora-qv-out-dropout",
        "lora",
        {"attn_targets": ["q", "v", "out"], "dropout": 0.1},
        4,
        LoraMultiheadAttention,
        True,
    ),
    (
        "lora-sqrt-scaling-qkvo-dropout",
        "lora",
        {"r": 4, "alpha": 12.0, "scaling": "alpha/sqrt(r)", "dropout": 0.1, "attn_targets": ["q", "k", "v", "out"]},
        4,
        LoraMultiheadAttention,
        True,
    ),
    ("lora-blocks", "lora", {"blocks": [0, 2]}, 2, LoraMultiheadAttention, True),
    ("lora-regex", "lora", {"target_modules": r"transformer\.resblocks\.[13]\.attn"}, 2, LoraMultiheadAttention, True),
    ("lora-mlp-linear", "lora", {"target_modules": ["mlp.c_fc", "mlp.c_proj"]}, 8, LoraLinear, True),
    ("mona-mlp", "mona", {}, 4, MonaBlock, False),
    ("mona-attn-blocks", "mona", {"placement": "attn", "blocks": [1, 3]}, 2, MonaBlock, False),
    ("mona-both-zero", "mona", {"placement": "both", "init": "zero"}, 4, MonaBlock, True),
    ("mona-released", "mona", {"placement": "released", "hidden_dim": 8, "blocks": [0, 2, 3]}, 3, MonaBlock, False),
    ("mona-noise-aware", "mona", {"variant": "noise_aware"}, 4, MonaBlock, False),
    ("mona-freq-enhanced", "mona", {"variant": "freq_enhanced", "blocks": [2, 3]}, 2, MonaBlock, False),
    ("mona-hybrid-zero", "mona", {"variant": "hybrid", "init": "zero"}, 4, MonaBlock, True),
]
LORA_CASES = [c for c in CASES if c[1] == "lora"]


def _encoder(adapter=None, kwargs=None, seed=0, model=TINY, layers=LAYERS, **kw):
    torch.manual_seed(seed)  # same seed -> same backbone; adapters are drawn after it
    return CLIPEncoder(model, layers=layers, adapter=adapter, adapter_kwargs=kwargs, **kw)


def _images(n=2, size=64, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _adapter_params(model):
    names = set(adapter_parameter_names(model))
    return {n: p for n, p in model.named_parameters() if n in names}


@torch.no_grad()
def _perturb(params, seed=2):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def tiny_base():
    return _encoder()


@pytest.fixture(scope="module")
def images():
    return _images()


# ----------------------------------------------------------------------------------------------- CASES invariants
@pytest.mark.parametrize(
    ("case", "adapter", "kwargs", "count", "wrapper", "identity"), CASES, ids=[c[0] for c in CASES]
)
class TestCases:
    def test_replacement_count_and_visibility(self, case, adapter, kwargs, count, wrapper, identity):
        enc = _encoder(adapter, kwargs)
        assert len(enc.targeted_module_names) == count
        wrapped = [m for m in enc.modules() if isinstance(m, wrapper)]
        assert len(wrapped) == count
        assert wrapper.__name__ in repr(enc)
        if adapter == "mona":
            placements = {"mlp": 1, "attn": 1, "both": 2, "released": 1}[kwargs.get("placement", "mlp")]
            assert sum(isinstance(m, Mona) for m in enc.modules()) == count * placements

    def test_init_identity(self, case, adapter, kwargs, count, wrapper, identity, tiny_base, images):
        enc = _encoder(adapter, kwargs)
        base = copy.deepcopy(tiny_base)
        # train mode: nn.MultiheadAttention then takes the same path as the LoRA wrapper (its fused inference
        # fast path differs from its own slow path by ~1e-7); no dropout is active on the frozen path.
        base.train(), enc.train()
        diff = _max_diff(base(images), enc(images))
        if identity:
            assert diff == 0.0
        else:
            assert diff > 1e-4  # Mona's reference init is not an identity
        base.eval(), enc.eval()
        with torch.no_grad():
            assert _max_diff(base(images), enc(images)) < (1e-5 if identity else float("inf"))

    def test_each_adapter_changes_output(self, case, adapter, kwargs, count, wrapper, identity, images):
        enc = _encoder(adapter, kwargs).eval()
        with torch.no_grad():
            ref = enc(images)
            for name in enc.targeted_module_names:
                layer = copy.deepcopy(enc.get_submodule(name))
                orig = enc.get_submodule(name)
                _perturb([p for n, p in orig.named_parameters() if not n.startswith("base_layer.")])
                assert _max_diff(ref, enc(images)) > 1e-6, f"adapter at {name} is ignored"
                parent, _, child = name.rpartition(".")
                setattr(enc.get_submodule(parent), child, layer)

    def test_only_adapters_and_head_train(self, case, adapter, kwargs, count, wrapper, identity, images):
        enc = _encoder(adapter, kwargs).train()
        head = nn.Conv2d(sum(enc.out_channels), 2, 1)
        adapters = _adapter_params(enc)
        assert adapters and {n for n, p in enc.named_parameters() if p.requires_grad} == set(adapters)
        frozen = {n: p.detach().clone() for n, p in enc.named_parameters() if n not in adapters}
        head_before = [p.detach().clone() for p in head.parameters()]
        params = [p for p in [*enc.parameters(), *head.parameters()] if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.5)
        target = torch.randint(0, 2, (images.shape[0], 4, 4))
        got_grad = dict.fromkeys(adapters, False)
        for _ in range(3):
            opt.zero_grad()
            loss = F.cross_entropy(head(torch.cat(enc(images), dim=1)), target)
            loss.backward()
            for n, p in adapters.items():
                got_grad[n] |= p.grad is not None and bool(p.grad.abs().sum() > 0)
            opt.step()
        assert all(got_grad.values()), [n for n, ok in got_grad.items() if not ok]
        for n, p in enc.named_parameters():
            if n in frozen:
                assert p.grad is None and torch.equal(p, frozen[n]), n
        assert all(not torch.equal(a, b) for a, b in zip(head_before, head.parameters(), strict=True))

    def test_parameter_names_prefixed(self, case, adapter, kwargs, count, wrapper, identity):
        enc = _encoder(adapter, kwargs)
        names = adapter_parameter_names(enc)
        assert names
        # lora_A, mona_mlp, ...; the released Mona keeps the release's attribute name, "mona"
        assert all(any(part == adapter or part.startswith(f"{adapter}_") for part in n.split(".")) for n in names)
        assert set(enc.adapter_state_dict()) == set(names)  # no adapter buffers in these configs

    def test_save_load_round_trip(self, case, adapter, kwargs, count, wrapper, identity, images, tmp_path):
        enc = _encoder(adapter, kwargs).eval()
        _perturb(_adapter_params(enc).values())
        path = tmp_path / "adapters.safetensors"
        save_adapters(enc, path)
        assert [p.name for p in tmp_path.iterdir()] == ["adapters.safetensors"]  # no temp file left
        other = _encoder(adapter, kwargs, seed=0).eval()
        torch.manual_seed(5)
        _perturb(_adapter_params(other).values(), seed=9)
        with torch.no_grad():
            assert _max_diff(enc(images), other(images)) > 0
            load_adapters(other, path)
            assert _max_diff(enc(images), other(images)) == 0.0
        meta = read_adapter_metadata(path)
        assert meta["adapter"] == adapter and meta["targets"] == enc.targeted_module_names
        assert meta["encoder"]["model_name"] == TINY
        # The file alone is enough to rebuild the adapters.
        again = _encoder(adapter_checkpoint=str(path)).eval()
        with torch.no_grad():
            assert _max_diff(enc(images), again(images)) == 0.0


# ----------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize(
    ("case", "adapter", "kwargs", "count", "wrapper", "identity"), LORA_CASES, ids=[c[0] for c in LORA_CASES]
)
def test_lora_merge_unmerge(case, adapter, kwargs, count, wrapper, identity, images):
    enc = _encoder(adapter, kwargs).eval()
    frozen = {k: v.clone() for k, v in enc.state_dict().items()}
    _perturb(_adapter_params(enc).values())
    with torch.no_grad():
        unmerged = enc(images)
        merge_adapters(enc)
        assert all(m.merged for m in enc.modules() if isinstance(m, wrapper))
        merged = enc(images)
        assert _max_diff(unmerged, merged) < 1e-5
        unmerge_adapters(enc)
        assert _max_diff(unmerged, enc(images)) < 1e-5
    for k, v in enc.state_dict().items():
        if "lora_" not in k:
            torch.testing.assert_close(v, frozen[k], atol=1e-6, rtol=0)


def test_lora_wrapper_matches_mha_contract():
    """Masks, cross-attention, attention weights and sequence-first layout behave as nn.MultiheadAttention."""
    torch.manual_seed(0)
    for batch_first in (True, False):
        mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).train()
        lora = LoraMultiheadAttention(copy.deepcopy(mha), LoraConfig(attn_targets=("q", "k", "v", "out")))
        shape = (2, 5, 32) if batch_first else (5, 2, 32)
        x, kv = torch.randn(shape), torch.randn(shape)
        causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
        pad = torch.tensor([[False] * 4 + [True], [False] * 5])
        calls = [
            {"query": x, "key": x, "value": x, "need_weights": False},
            {"query": x, "key": x, "value": x, "attn_mask": causal, "need_weights": False},
            {
                "query": x,
                "key": x,
                "value": x,
                "attn_mask": causal.float() * -1e4,
                "key_padding_mask": pad.float() * -1e4,
            },
            {"query": x, "key": kv, "value": kv, "need_weights": True, "average_attn_weights": False},
        ]
        for call in calls:
            out, w = mha(**call)
            got, got_w = lora(**call)
            torch.testing.assert_close(got, out, atol=1e-6, rtol=1e-5)
            if call.get("need_weights", True):
                torch.testing.assert_close(got_w, w, atol=1e-6, rtol=1e-5)
            else:
                assert got_w is None


def test_lora_rejects_mha_out_proj():
    enc = _encoder()
    with pytest.raises(ValueError, match="never calls"):
        inject_adapters(enc.visual, LoraConfig(target_modules=["attn.out_proj"]))


# ----------------------------------------------------------------------------------------------- Mona
def _reference_mona(m: Mona, x: torch.Tensor, variant: str = "baseline", grid=None) -> torch.Tensor:
    """Yin et al.'s forward (github.com/Leiyi-Hu/mona), with the class token passed around the convolutions.

    Tokens are laid out row by row on the ``(gh, gw)`` grid (square when ``grid`` is None), as in the reference.
    """
    identity = x
    x = m.norm(x) * m.gamma + x * m.gammax
    h = m.project1(x)
    cls, p = h[:, :1], h[:, 1:]
    b, n, c = p.shape
    gh, gw = grid or (int(n**0.5), int(n**0.5))
    p = p.reshape(b, gh, gw, c).permute(0, 3, 1, 2)
    p = _reference_variant_op(m.adapter_conv, p, variant)
    p = p.permute(0, 2, 3, 1).reshape(b, n, c)
    h = torch.cat([cls, p], dim=1)
    return identity + m.project2(m.dropout(F.gelu(h)))


def _reference_variant_op(op, x, variant):
    """Qu et al.'s MonaOp variants as written there: FFT filter, softmax weights over the three convolutions."""
    identity = x
    if variant in ("freq_enhanced", "hybrid"):
        h, w = x.shape[-2:]
        x = torch.fft.irfft2(torch.fft.rfft2(x) * op.freq_filter.view(1, -1, 1, 1), s=(h, w))
    convs = [op.conv1(x), op.conv2(x), op.conv3(x)]
    if variant in ("noise_aware", "hybrid"):
        weights = op.noise_estimator(x)  # (B, 3, 1, 1)
        x = sum(c * weights[:, i : i + 1] for i, c in enumerate(convs)) + identity
    else:
        x = sum(convs) / 3.0 + identity
    return op.projector(x) + x


@pytest.mark.parametrize("variant", ["baseline", "noise_aware", "freq_enhanced", "hybrid"])
def test_mona_matches_reference_formula(variant):
    torch.manual_seed(0)
    m = Mona(48, hidden_dim=16, variant=variant).eval()
    with torch.no_grad():
        m.gamma.fill_(0.3)  # make the LayerNorm branch visible
        for p in m.adapter_conv.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 1 + 36, 48)
    torch.testing.assert_close(m(x), _reference_mona(m, x, variant), atol=1e-5, rtol=0)
    # The class token skips the convolutions: changing patch tokens leaves its output unchanged.
    y = x.clone()
    y[:, 1:] += 1.0
    torch.testing.assert_close(m(y)[:, 0], m(x)[:, 0], atol=0, rtol=0)


def test_mona_grid_comes_from_the_input():
    m = Mona(16, hidden_dim=8, num_prefix_tokens=1, grid_size=(2, 8)).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 1 + 16, 16)).shape == (1, 17, 16)  # matches the hint (2 x 8)
        assert m(torch.randn(1, 1 + 36, 16)).shape == (1, 37, 16)  # another size: inferred 6 x 6
        with pytest.raises(ValueError, match="15 patch tokens"):
            m(torch.randn(1, 1 + 15, 16))


def test_mona_gradients_reach_every_module(images):
    enc = _encoder("mona", {"placement": "both"}).train()
    sum(f.square().mean() for f in enc(images)).backward()
    monas = [m for m in enc.modules() if isinstance(m, Mona)]
    assert len(monas) == 8
    for m in monas:
        for n, p in m.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_mona_block_keeps_open_clip_signature_under_checkpointing(images):
    assert list(inspect.signature(MonaBlock.forward).parameters) == list(
        inspect.signature(ResidualAttentionBlock.forward).parameters
    )
    grads = []
    for ckpt in (False, True):
        enc = _encoder("mona", grad_checkpointing=ckpt).train()
        for m in enc.modules():
            if isinstance(m, Mona):
                m.dropout.p = 0.0
        sum(f.square().mean() for f in enc(images)).backward()
        grads.append([p.grad for p in _adapter_params(enc).values()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("ckpt", "runs"), [(False, 1), (True, 2)])
def test_grad_checkpointing_recomputes_blocks_in_the_backward_pass(images, ckpt, runs):
    """grad_checkpointing=True must switch checkpointing on: each block's MLP runs again during backward."""
    enc = _encoder("mona", grad_checkpointing=ckpt).train()
    fc = next(
        m for n, m in enc.named_modules() if n.startswith("visual.transformer.resblocks.0.") and n.endswith("c_fc")
    )
    calls = []
    fc.register_forward_hook(lambda *_: calls.append(1))
    features = enc(images)
    assert len(calls) == 1
    sum(f.square().mean() for f in features).backward()
    assert len(calls) == runs


@pytest.mark.parametrize("placement", ["mlp", "attn"])
def test_mona_placement_takes_the_residual_stream_it_names(images, placement):
    """Mona after the MLP (default) sees the whole block's output; after attention, the attention residual only."""
    enc = _encoder("mona", {"placement": placement} if placement != "mlp" else None).eval()
    block = next(m for m in enc.modules() if isinstance(m, MonaBlock))
    mona = block.mona_mlp if placement == "mlp" else block.mona_attn
    assert mona is not None and (block.mona_attn if placement == "mlp" else block.mona_mlp) is None
    seen: dict[str, torch.Tensor] = {}

    def block_input(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["q_x"]

    def mona_input(module, args):
        seen["mona_in"] = args[0]

    block.register_forward_pre_hook(block_input, with_kwargs=True)
    mona.register_forward_pre_hook(mona_input)
    with torch.no_grad():
        enc(images)
        b, x = block.base_layer, seen["x"]
        after_attn = x + b.ls_1(b.attention(q_x=b.ln_1(x)))
        expected = after_attn + b.ls_2(b.mlp(b.ln_2(after_attn))) if placement == "mlp" else after_attn
    torch.testing.assert_close(seen["mona_in"], expected, atol=1e-5, rtol=0)


def test_mona_refuses_other_blocks():
    with pytest.raises(TypeError, match="Mona cannot wrap"):
        inject_adapters(nn.Sequential(nn.Linear(4, 4)), MonaConfig(target_modules=["0"]))


@pytest.mark.parametrize("init", ["mona", "zero"])
def test_mona_init_values_and_output_at_init(init):
    """gamma = 1e-6 and gammax = 1 (the reference init), so at init z = x + 1e-6 * LN(x), and the up-projection is
    PyTorch's default (``mona``) or zero. Catches gamma initialised to 1 or gammax to 0, and ``zero`` missing a tensor.
    """
    torch.manual_seed(0)
    m = Mona(48, hidden_dim=16, init=init).eval()
    assert torch.equal(m.gamma, torch.full((48,), 1e-6)) and torch.equal(m.gammax, torch.ones(48))
    assert m.norm.weight.eq(1).all() and m.norm.bias.eq(0).all()
    bound = 1 / 16**0.5  # nn.Linear's default init for 16 inputs: U(-1/sqrt(16), 1/sqrt(16))
    if init == "zero":
        assert not m.project2.weight.any() and not m.project2.bias.any()
    else:
        assert 0.8 * bound < m.project2.weight.abs().max() <= bound
    assert 0.8 / 48**0.5 < m.project1.weight.abs().max() <= 1 / 48**0.5  # the down-projection is never zeroed
    x = 3.0 * torch.randn(2, 1 + 16, 48) + 1.0
    with torch.no_grad():
        z = x + 1e-6 * F.layer_norm(x, (48,))  # gamma, gammax written out, not read from the module
        h = m.project1(z)
        p = h[:, 1:].reshape(2, 4, 4, 16).permute(0, 3, 1, 2)
        p = _reference_variant_op(m.adapter_conv, p, "baseline").permute(0, 2, 3, 1).reshape(2, 16, 16)
        want = x + m.project2(F.gelu(torch.cat([h[:, :1], p], dim=1)))
        torch.testing.assert_close(m(x), want, atol=1e-5, rtol=0)


def test_mona_dropout_acts_before_the_up_projection():
    """Dropout sits between GELU and project2 (the reference's order): the same mask, drawn on the (B, L, 16) hidden
    tokens, gives the reference output. Catches dropout moved after the up-projection (a (B, L, 48) mask)."""
    torch.manual_seed(0)
    m = Mona(48, hidden_dim=16, dropout=0.5).train()
    x = torch.randn(2, 1 + 16, 48)
    with torch.no_grad():
        torch.manual_seed(7)
        got = m(x)
        torch.manual_seed(7)
        want = _reference_mona(m, x)  # the reference's own nn.Dropout call, same seed: the same mask
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert (got - m.eval()(x)).abs().max() > 1e-3  # dropout is active in training


def test_mona_non_square_grid_matches_reference():
    """On a non-square (2 x 8) grid the tokens are laid out as 2 rows of 8, as the tower's patch grid: the output
    equals the reference convolved on that grid. Catches the grid read as (gw, gh) (shapes alone agree)."""
    torch.manual_seed(0)
    m = Mona(24, hidden_dim=8, num_prefix_tokens=1, grid_size=(2, 8)).eval()
    with torch.no_grad():
        m.gamma.fill_(0.3)
        for p in m.adapter_conv.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 1 + 16, 24)
    with torch.no_grad():
        want = _reference_mona(m, x, grid=(2, 8))
        torch.testing.assert_close(m(x), want, atol=1e-5, rtol=0)
        assert (want - _reference_mona(m, x, grid=(8, 2))).abs().max() > 1e-3  # the layouts are distinguishable


def test_mona_zero_init_block_equals_the_block_with_trained_norms(images):
    """With init='zero' and placement='both', MonaBlock computes exactly the wrapped block, also when ln_1 and ln_2
    differ (pretrained weights). Random init makes every LayerNorm (1, 0) and every attention bias 0, so a block
    re-composed with ln_1 in place of ln_2, or without a bias, would pass the identity test on a fresh tower."""
    base = _encoder().train()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in base.named_parameters():
            if ".ln_" in n or n.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g) + (1.0 if n.endswith("weight") else 0.0))
    enc = copy.deepcopy(base)
    inject_adapters(enc.visual, MonaConfig(placement="both", init="zero"))
    enc.train()
    assert sum(isinstance(m, MonaBlock) for m in enc.modules()) == 4
    assert _max_diff(base(images), enc(images)) == 0.0


def test_mona_placement_mismatch_is_named(tmp_path):
    """placement is structural: a file trained after the attention refuses to load into an MLP-placed module,
    with the field named (not only a key-set mismatch)."""
    save_adapters(_encoder("mona", {"placement": "attn"}), tmp_path / "attn.safetensors")
    with pytest.raises(ValueError, match="placement='attn' in the file but placement='mlp' in the module"):
        load_adapters(_encoder("mona"), tmp_path / "attn.safetensors")


# ----------------------------------------------------------------------------------------------- errors
def test_no_match_lists_patterns_and_names():
    enc = _encoder()
    with pytest.raises(ValueError, match=r"matched target_modules=\['nope'\].*transformer"):
        inject_adapters(enc.visual, LoraConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match=r"blocks=\[7\]"):
        inject_adapters(enc.visual, LoraConfig(blocks=[7]))


def test_double_injection_refused():
    enc = _encoder("lora")
    with pytest.raises(ValueError, match="already holds an adapter"):
        inject_adapters(enc.visual, LoraConfig())


def test_blocks_and_regex_select_the_named_modules():
    """Which modules are wrapped, by name, not only how many. Catches ``blocks`` selecting the complement (the same
    count for 2 of 4 blocks), a list entry matched as a bare string suffix ('fc' in 'c_fc') instead of a ``.suffix``,
    and block indices read as one digit (blocks 10 and 11 of a 12-block ViT-B)."""
    visual = _encoder().visual
    attn = "transformer.resblocks.{}.attn"
    assert find_targets(visual, LoraConfig(blocks=[0, 2])) == [attn.format(0), attn.format(2)]
    assert find_targets(visual, MonaConfig(blocks=[3, 1])) == ["transformer.resblocks.1", "transformer.resblocks.3"]
    assert find_targets(visual, LoraConfig(target_modules=r"transformer\.resblocks\.[13]\.attn")) == [
        attn.format(1),
        attn.format(3),
    ]
    assert find_targets(visual, LoraConfig(target_modules=["c_fc"])) == [
        f"transformer.resblocks.{i}.mlp.c_fc" for i in range(4)
    ]
    with pytest.raises(ValueError, match=r"matched target_modules=\['fc'\]"):
        find_targets(visual, LoraConfig(target_modules=["fc"]))  # 'fc' is no .suffix of 'mlp.c_fc'
    assert [block_index(n) for n in ("visual.transformer.resblocks.11.attn", "trunk.blocks.10", "resblocks.3")] == [
        11,
        10,
        3,
    ]
    assert block_index("visual.proj") is None and block_index("transformer.resblocks.attn") is None
    twelve = nn.Module()
    twelve.transformer = nn.Module()
    twelve.transformer.resblocks = nn.ModuleList(nn.Module() for _ in range(12))
    for blk in twelve.transformer.resblocks:
        blk.attn = nn.MultiheadAttention(8, 2, batch_first=True)
    assert find_targets(twelve, LoraConfig(blocks=[1, 10, 11])) == [attn.format(i) for i in (1, 10, 11)]


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("dora", {}, r"adapter='dora' is not registered; choose one of \['lora', 'mona'\]"),
        ("lora", {"rank": 8}, r"unknown keys \['rank'\].*allowed"),
        ("lora", {"r": 0}, "r=0 must be a positive int"),
        ("lora", {"attn_targets": ["q", "x"]}, "attn_targets"),
        ("mona", {"placement": "ffn"}, "placement='ffn' must be one of"),
        ("mona", {"init": "xavier"}, "init='xavier'"),
        ("mona", {"variant": "fractional"}, "variant='fractional' must be one of"),
    ],
)
def test_config_errors(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_adapter_config(name, kwargs)


def test_registry_and_report():
    assert list_adapters() == ["lora", "mona"] and ADAPTERS["lora"] is LoraConfig
    enc = _encoder("lora")
    trainable, total = count_parameters(enc)
    assert trainable == 4 * 3 * 2 * 16 * 64
    assert parameter_report(enc) == (
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    )


def test_merge_refuses_mona():
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_adapters(_encoder("mona"))


# ----------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture
def lora_file(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_adapters(_encoder("lora", {"r": 8}), path)
    return path


@pytest.mark.parametrize(
    ("adapter", "kwargs", "model", "match"),
    [
        ("mona", {}, TINY, "holds 'lora' adapters but the module has 'mona'"),
        ("lora", {"r": 16}, TINY, "r=8 in the file but r=16"),
        ("lora", {"r": 8, "alpha": 32.0}, TINY, "alpha=16.0 in the file but alpha=32.0"),
        ("lora", {"r": 8, "blocks": [0, 1]}, TINY, "adapts other modules"),
        ("lora", {"r": 8, "attn_targets": ["q", "v"]}, TINY, "attn_targets"),
        ("lora", {"r": 8, "scaling": "alpha/sqrt(r)"}, TINY, r"scaling='alpha/r' in the file but scaling='alpha/sqrt"),
        ("lora", {"r": 8}, "usclip-demo-vit", "model_name='usclip-test-vit'"),
    ],
)
def test_load_into_other_configuration_fails(lora_file, adapter, kwargs, model, match):
    with pytest.raises(ValueError, match=match):
        load_adapters(_encoder(adapter, kwargs, model=model), lora_file)


def test_mona_variant_mismatch_fails(tmp_path):
    save_adapters(_encoder("mona"), tmp_path / "mona.safetensors")
    with pytest.raises(ValueError, match="variant='baseline' in the file but variant='hybrid'"):
        load_adapters(_encoder("mona", {"variant": "hybrid"}), tmp_path / "mona.safetensors")


def test_load_is_strict_about_keys(lora_file, tmp_path):
    with safe_open(str(lora_file), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    dropped = dict(list(tensors.items())[1:])
    save_file(dropped, tmp_path / "missing.safetensors", metadata=meta)
    with pytest.raises(ValueError, match=r"missing \['visual"):
        load_adapters(_encoder("lora", {"r": 8}), tmp_path / "missing.safetensors")
    save_file({**tensors, "visual.extra": torch.zeros(1)}, tmp_path / "extra.safetensors", metadata=meta)
    with pytest.raises(ValueError, match=r"unexpected \['visual.extra'\]"):
        load_adapters(_encoder("lora", {"r": 8}), tmp_path / "extra.safetensors")
    save_file(tensors, tmp_path / "nometa.safetensors")
    with pytest.raises(ValueError, match="not written by save_adapters"):
        load_adapters(_encoder("lora", {"r": 8}), tmp_path / "nometa.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_adapter_metadata(tmp_path / "junk.safetensors")


def test_checkpoint_metadata_is_json_config(lora_file):
    with safe_open(str(lora_file), framework="pt") as f:
        meta = json.loads(f.metadata()["usclip_adapters"])
    assert meta["format"] == "usclip-adapters" and meta["config"]["r"] == 8
    assert meta["encoder"]["layers"] == list(LAYERS)


def test_save_from_wrapping_module_loads_into_bare_encoder(tmp_path, images):
    task = nn.Module()
    task.encoder = _encoder("lora").eval()
    task.head = nn.Linear(2, 2)
    _perturb(_adapter_params(task.encoder).values())
    save_adapters(task, tmp_path / "a.safetensors")
    bare = _encoder("lora").eval()
    load_adapters(bare, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert _max_diff(task.encoder(images), bare(images)) == 0.0


def test_pretrained_mismatch_refused_for_tags_warned_for_paths(tmp_path, caplog):
    """The file records the encoder's ``pretrained``: two different weight names (open_clip tags, hf-hub ids) refuse
    to load; a file path on either side (machine-specific) only warns. Catches tags not counted as weight names."""
    src = _encoder("lora")
    src.encoder_config["pretrained"] = "openai"
    path = tmp_path / "a.safetensors"
    save_adapters(src, path)
    assert read_adapter_metadata(path)["encoder"]["pretrained"] == "openai"
    for other in ("laion2b_s34b_b88k", "hf-hub:org/clip"):
        dst = _encoder("lora")
        dst.encoder_config["pretrained"] = other
        match = rf"trained on pretrained='openai' weights but the encoder has pretrained='{other}'"
        with pytest.raises(ValueError, match=match):
            load_adapters(dst, path)
    for same_or_path, warns in (("openai", False), ("weights/ViT-B-16.safetensors", True)):
        dst = _encoder("lora")
        dst.encoder_config["pretrained"] = same_or_path
        caplog.clear()
        with caplog.at_level("WARNING", logger="usclip.adapters._checkpoint"):
            load_adapters(dst, path)
        assert any("was trained with pretrained='openai'" in r.getMessage() for r in caplog.records) == warns
        assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.adapter_state_dict().items())


def test_file_of_the_whole_tower_loads_into_a_pruned_encoder(tmp_path, images):
    """A file adapting all 4 blocks loads into an encoder pruned after block 1 (blocks 2 and 3 skipped) or block 2
    (block 3 skipped), with the kept blocks' weights; a file adapting fewer blocks than the encoder still refuses.
    Catches the pruned-block test off by one (block 2 of a 2-block tower counted as present)."""
    src = _encoder("lora", layers=(3,)).eval()
    _perturb(_adapter_params(src).values())
    path = tmp_path / "whole.safetensors"
    save_adapters(src, path)
    for layers, kept in (((1,), 2), ((0, 2), 3)):
        dst = _encoder("lora", layers=layers).eval()
        assert len(dst.visual.transformer.resblocks) == kept
        load_adapters(dst, path)
        got = dst.adapter_state_dict()
        assert len(got) == 3 * 2 * kept and all(torch.equal(v, src.adapter_state_dict()[k]) for k, v in got.items())
    save_adapters(dst, tmp_path / "three.safetensors")
    with pytest.raises(ValueError, match="adapts other modules"):
        load_adapters(_encoder("lora", layers=(3,)), tmp_path / "three.safetensors")


def test_load_into_merged_lora(tmp_path, images):
    src = _encoder("lora").eval()
    _perturb(_adapter_params(src).values())
    save_adapters(src, tmp_path / "a.safetensors")
    dst = _encoder("lora").eval()
    merge_adapters(dst)
    load_adapters(dst, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert _max_diff(src(images), dst(images)) < 1e-5


# ----------------------------------------------------------------------------------------------- guards
def test_open_clip_block_structure_guard():
    """Fails loudly if open_clip renames what MonaBlock and LoraMultiheadAttention rely on (pinned 3.3.*)."""
    assert open_clip.__version__.startswith("3.3"), open_clip.__version__
    blk = open_clip.create_model(TINY).visual.transformer.resblocks[0]
    assert isinstance(blk, ResidualAttentionBlock)
    for attr in OPEN_CLIP_BLOCK_ATTRS:
        assert hasattr(blk, attr), f"open_clip ResidualAttentionBlock lost {attr!r}"
    assert isinstance(blk.attn, nn.MultiheadAttention) and blk.attn.batch_first
    assert blk.attn.in_proj_weight.shape == (3 * 64, 64) and blk.attn._qkv_same_embed_dim
    assert isinstance(blk.mlp.c_fc, nn.Linear) and isinstance(blk.mlp.c_proj, nn.Linear)
    assert list(inspect.signature(blk.attention).parameters) == ["q_x", "k_x", "v_x", "attn_mask"]


# ----------------------------------------------------------------------------------------------- ViT-B-16
@pytest.fixture(scope="module")
def vitb_images():
    return _images(n=1, size=224)


def test_vitb_lora_identity_and_merge(vitb_images):
    base = _encoder(model="ViT-B-16", layers=(3, 6, 9)).train()
    enc = _encoder("lora", {"r": 16}, model="ViT-B-16", layers=(3, 6, 9)).train()
    with torch.no_grad():
        assert _max_diff(base(vitb_images), enc(vitb_images)) == 0.0
        del base
        enc.eval()
        _perturb(_adapter_params(enc).values())
        unmerged = enc(vitb_images)
        merge_adapters(enc)
        assert _max_diff(unmerged, enc(vitb_images)) < 1e-5


def test_vitb_mona_gradients_and_image_size(vitb_images):
    enc = _encoder("mona", model="ViT-B-16", layers=(3,)).train()
    monas = [m for m in enc.modules() if isinstance(m, Mona)]
    assert len(monas) == 4  # blocks 0-3 x one placement
    sum(f.square().mean() for f in enc(vitb_images)).backward()
    for m in monas:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    with pytest.raises(ValueError, match=r"built for image_size=\(224, 224\).*CLIPEncoder\(image_size=320\)"):
        enc(torch.zeros(1, 3, 320, 320))


@pytest.mark.slow
def test_vitb_mona_at_320_px():
    enc = _encoder("mona", {"placement": "both"}, model="ViT-B-16", layers=(3, 6, 9), image_size=320).train()
    assert sum(isinstance(m, Mona) for m in enc.modules()) == 20
    feats = enc(_images(n=1, size=320))
    assert [tuple(f.shape) for f in feats] == [(1, 768, 20, 20)] * 3
    sum(f.square().mean() for f in feats).backward()
    assert all(p.grad is not None for p in _adapter_params(enc).values())


@pytest.mark.slow
def test_vitb_lora_training_moves_only_adapters(vitb_images):
    enc = _encoder("lora", model="ViT-B-16", layers=(3, 6, 9)).train()
    frozen = {n: p.detach().clone() for n, p in enc.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in enc.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        sum(f.square().mean() for f in enc(vitb_images)).backward()
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in enc.named_parameters() if n in frozen)
    assert all(p.abs().sum() > 0 for n, p in enc.named_parameters() if "lora_B" in n)


def test_vitb_parameter_counts():
    """The figures quoted in docs/adapters.md (visual tower pruned after block 9)."""
    mona = _encoder("mona", model="ViT-B-16", layers=(3, 6, 9))
    lora = _encoder("lora", {"r": 16}, model="ViT-B-16", layers=(3, 6, 9))
    assert count_parameters(mona)[0] == 10 * 111_872 == 1_118_720
    assert count_parameters(lora)[0] == 10 * 3 * 2 * 16 * 768 == 737_280
    assert count_parameters(lora)[1] - count_parameters(lora)[0] == 71_622_144  # frozen blocks 0-9 + embeddings
