"""The sparse-backward RoIAlign: torchvision's numbers, forward and backward, and torchvision's
function back in place after any number of (concurrent) blocks."""

from __future__ import annotations

import threading

import torch
from torchvision.ops import poolers, roi_align

from explainkit.models.roi_align import _roi_align, sparse_roi_align_backward


def test_forward_and_backward_equal_torchvisions_with_rows_of_zero_gradient():
    torch.manual_seed(0)
    features = torch.randn(2, 8, 20, 24, requires_grad=True)
    boxes = torch.rand(30, 4) * 16
    boxes[:, 2:] += boxes[:, :2] + 1
    rois = torch.cat([torch.randint(0, 2, (30, 1)).float(), boxes], dim=1)
    upstream = torch.randn(30, 8, 7, 7)
    upstream[::3] = 0  # the regions a box's score does not depend on
    expected = roi_align(features, rois, (7, 7), spatial_scale=0.5, sampling_ratio=2)
    (expected_grad,) = torch.autograd.grad(expected, features, upstream)
    ours = _roi_align(features, rois, (7, 7), spatial_scale=0.5, sampling_ratio=2)
    (ours_grad,) = torch.autograd.grad(ours, features, upstream)
    assert torch.equal(ours, expected)
    assert torch.allclose(ours_grad, expected_grad, atol=1e-6)


def test_the_block_restores_torchvisions_function_also_across_threads():
    original = poolers.roi_align
    with sparse_roi_align_backward():
        assert poolers.roi_align is _roi_align
        with sparse_roi_align_backward():
            pass
        assert poolers.roi_align is _roi_align  # the outer block still needs it
    assert poolers.roi_align is original
    barrier = threading.Barrier(4)

    def explain_at_once() -> None:
        with sparse_roi_align_backward():
            barrier.wait()

    threads = [threading.Thread(target=explain_at_once) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert poolers.roi_align is original
