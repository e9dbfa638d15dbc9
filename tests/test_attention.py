"""FastMultiheadAttention: same keys, outputs and gradients as nn.MultiheadAttention; fallbacks; encoder swap."""

import copy

import pytest
import torch
from torch import nn

from usclip.attention import FastMultiheadAttention, use_fast_attention
from usclip.models import CLIPEncoder


def _pair(dropout=0.0, batch_first=True):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, dropout=dropout, batch_first=batch_first)
    return mha, FastMultiheadAttention.from_module(copy.deepcopy(mha))


def test_same_parameters_keys_and_outputs_in_training():
    mha, fast = _pair()
    assert list(fast.state_dict()) == list(mha.state_dict())
    mha.train(), fast.train()
    x = torch.randn(3, 7, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    a, wa = mha(x, x, x, need_weights=False)
    b, wb = fast(x2, x2, x2, need_weights=False)
    assert wa is None and wb is None and b.shape == (3, 7, 32)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    a.square().sum().backward()
    b.square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, dict(mha.named_parameters())[name].grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_equal_to_multihead_attention_with_trained_biases(training):
    """With non-zero q/k/v and output biases (pretrained weights; a fresh nn.MultiheadAttention has them at 0) the
    fast path equals nn.MultiheadAttention. Catches a dropped in_proj or out_proj bias."""
    mha, _ = _pair()
    with torch.no_grad():
        mha.in_proj_bias.normal_(0.0, 0.5)
        mha.out_proj.bias.normal_(0.0, 0.5)
    fast = FastMultiheadAttention.from_module(copy.deepcopy(mha))
    mha.train(training), fast.train(training)
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        want = mha(x, x, x, need_weights=False)[0]
        assert (want - mha.out_proj.bias).abs().max() > 0.1
        torch.testing.assert_close(fast(x, x, x, need_weights=False)[0], want, rtol=1e-5, atol=1e-6)


def test_from_module_shares_parameters():
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    fast = FastMultiheadAttention.from_module(mha)
    assert fast.in_proj_weight is mha.in_proj_weight and fast.out_proj is mha.out_proj
    assert fast.num_heads == 4 and fast.batch_first


@pytest.mark.parametrize(
    "kwargs",
    [
        {"need_weights": True},
        {"need_weights": False, "attn_mask": torch.triu(torch.ones(7, 7, dtype=torch.bool), 1)},
        {"need_weights": False, "key_padding_mask": torch.tensor([[False] * 6 + [True]] * 3)},
    ],
)
def test_other_calls_fall_back_to_multihead_attention(kwargs):
    mha, fast = _pair()
    mha.eval(), fast.eval()
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        a, wa = mha(x, x, x, **kwargs)
        b, wb = fast(x, x, x, **kwargs)
    assert torch.equal(a, b)
    assert (wa is None) == (wb is None) and (wa is None or torch.equal(wa, wb))


def test_sequence_first_and_cross_attention_fall_back():
    mha, fast = _pair(batch_first=False)
    x, y = torch.randn(7, 3, 32), torch.randn(5, 3, 32)
    with torch.no_grad():
        assert torch.equal(mha(x, x, x, need_weights=False)[0], fast(x, x, x, need_weights=False)[0])
        assert torch.equal(mha(x, y, y, need_weights=False)[0], fast(x, y, y, need_weights=False)[0])


def test_dropout_only_in_training():
    _, fast = _pair(dropout=0.5)
    x = torch.randn(2, 5, 32)
    fast.eval()
    with torch.no_grad():
        assert torch.equal(fast(x, x, x, need_weights=False)[0], fast(x, x, x, need_weights=False)[0])
    fast.train()
    with torch.no_grad():
        assert not torch.equal(fast(x, x, x, need_weights=False)[0], fast(x, x, x, need_weights=False)[0])


def test_use_fast_attention_replaces_plain_modules_only():
    model = nn.Sequential(nn.MultiheadAttention(32, 4, batch_first=True), FastMultiheadAttention(32, 4))
    assert use_fast_attention(model) == 1
    assert all(type(m) is FastMultiheadAttention for m in model)
    assert use_fast_attention(model) == 0


def test_encoder_blocks_use_fast_attention():
    enc = CLIPEncoder("usclip-test-vit", layers=(1,))
    attns = [b.attn for b in enc.visual.transformer.resblocks]
    assert len(attns) == 2 and all(type(a) is FastMultiheadAttention for a in attns)
