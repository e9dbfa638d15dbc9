"""Cost structure of the training step (FLOPs counted, never timed) and the compile option."""

import pytest
import torch

from usclip.models import CLIPEncoder
from usclip.profiling import flop_counter
from usclip.tasks import SegmentationTask

L_TOKENS, WIDTH, PATCH = 197, 768, 16


def _block_flops(batch: int) -> int:
    """Forward FLOPs of one ViT-B/16 block at 224 px: q/k/v, output projection, MLP, and the two attention GEMMs."""
    rows = batch * L_TOKENS
    linear = 2 * rows * WIDTH * (3 * WIDTH + WIDTH + 4 * WIDTH + 4 * WIDTH)
    attention = 2 * 2 * batch * L_TOKENS * L_TOKENS * WIDTH
    return linear + attention


def _flops(fn) -> int:
    counter = flop_counter()
    with counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def vitb_encoder():
    torch.manual_seed(0)
    return CLIPEncoder("ViT-B-16", layers=(3, 6, 9), adapter="mona")


def test_encoder_runs_only_the_blocks_up_to_the_deepest_read(vitb_encoder):
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        flops = _flops(lambda: vitb_encoder(x))
    patch_embed = 2 * 196 * (3 * PATCH * PATCH) * WIDTH
    expected = 10 * _block_flops(1) + patch_embed  # blocks 0-9 of 12; Mona adds < 2 %
    assert expected <= flops <= 1.02 * expected


def test_frozen_backbone_costs_no_weight_gradients(vitb_encoder):
    """Backward through the frozen blocks computes input gradients only: about one forward, not two."""
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        forward = _flops(lambda: vitb_encoder(x))

    def step():
        feats = vitb_encoder(x)
        sum(f.square().mean() for f in feats).backward()

    vitb_encoder.train()
    total = _flops(step)
    # Mona in block 0 sits after its MLP, so gradients cross blocks 1-9 (and the attention's backward costs
    # two GEMMs per forward GEMM): well under the 3x of a full fine-tune.
    assert 1.8 * forward <= total <= 2.1 * forward


def test_flop_counter_counts_cpu_attention():
    q = torch.rand(2, 4, 10, 8, requires_grad=True)
    counter = flop_counter()
    with counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    forward = 2 * (2 * 2 * 4 * 10 * 10 * 8)  # QK^T and PV
    # torch's backward formula: the scores recomputed, then dP, dV, dQ and dK: five GEMMs of the forward's two
    assert counter.get_total_flops() == forward + 5 * forward // 2


def test_compile_encoder_keeps_state_dict_and_outputs(monkeypatch):
    calls = []
    real_compile = torch.compile

    def eager_compile(module):
        calls.append(module)
        return real_compile(module, backend="eager")  # inductor would take minutes; the wiring is what is tested

    kwargs = {"model_name": "usclip-test-vit", "layers": [1, 3], "adapter": "mona", "image_size": 64}
    kwargs["pretrained"] = None  # random weights, written out (BaseTask has no default)
    torch.manual_seed(0)
    plain = SegmentationTask(**kwargs).eval()
    monkeypatch.setattr(torch, "compile", eager_compile)
    torch.manual_seed(0)
    compiled = SegmentationTask(compile_encoder=True, **kwargs).eval()
    assert len(calls) == 1 and calls[0] is compiled.encoder
    assert list(compiled.state_dict()) == list(plain.state_dict())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), plain(x))
