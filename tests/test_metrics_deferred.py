"""Segmentation metrics deferred to the end of a loop (issue #25): the same values, no host sync per batch.

Masks are non-square (20 x 28) and include an empty prediction and an empty target, so the empty-mask policies
and the distance padding are exercised.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import usclip.metrics.protocol as protocol_module
from usclip.metrics import SegmentationMetrics
from usclip.tasks.segmentation import DEFER_METRICS_MB


def _batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(4):
        preds = torch.rand(3, 20, 28, generator=g) > 0.7
        target = torch.zeros(3, 20, 28, dtype=torch.bool)
        target[:, 4 : 10 + b, 3 : 20 - b] = True
        if b == 1:
            preds[0] = False  # an empty prediction
            target[2] = False  # an empty target
        out.append((preds, target, torch.arange(3 * b, 3 * b + 3) * 2 + 1))  # indices not 0..n-1
    return out


@pytest.mark.parametrize("protocol", ["strict", "authors"])
def test_deferred_values_equal_per_batch_values(protocol):
    """Catches: deferred masks dropped at compute, indices misaligned with their rows, or a flush that counts a
    batch twice."""
    now, later = SegmentationMetrics(protocol=protocol), SegmentationMetrics(protocol=protocol, defer_mb=1.0)
    for preds, target, index in _batches():
        now.update(preds, target, index=index)
        later.update(preds, target, index=index)
    assert len(later._pending) == 4  # nothing computed yet
    a, b = now.per_image(), later.per_image()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, equal_nan=True, msg=name)
    for name, value in now.compute().items():
        torch.testing.assert_close(later.compute()[name], value, rtol=0, atol=0, equal_nan=True, msg=name)
    assert int(later.compute()["empty_preds"]) >= 1 and int(later.compute()["empty_targets"]) == 1


def test_deferred_update_does_not_wait_on_the_device_and_flushes_at_the_budget():
    """No boundary-size synchronisation (``tolist``) per batch; a full budget computes what it holds."""
    batches = _batches(1)
    metric = SegmentationMetrics(defer_mb=2 * 3 * 20 * 28 * 2.5 / 2**20)  # room for two batches, not three
    with mock.patch.object(protocol_module, "surface_distances", wraps=protocol_module.surface_distances) as spy:
        metric.update(*batches[0][:2])
        metric.update(*batches[1][:2])
        assert spy.call_count == 0
        metric.update(*batches[2][:2])  # over the budget: the three batches measured together
        assert spy.call_count == 1 and metric._pending == []
        metric.update(*batches[3][:2])
        values = metric.compute()
        assert spy.call_count == 2
    assert metric._column("index").tolist() == list(range(12))  # default numbering counts deferred images
    metric.reset()
    assert metric._pending == [] and metric._column("index").numel() == 0
    assert values["dice"].isfinite()


def test_tasks_defer_and_bad_budget_is_refused():
    assert DEFER_METRICS_MB > 0
    with pytest.raises(ValueError, match=r"`defer_mb` must be >= 0 megabytes \(0: no deferral\), got -1"):
        SegmentationMetrics(defer_mb=-1)
