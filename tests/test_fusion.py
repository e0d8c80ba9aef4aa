"""Position word from boxes and outside-box down-weighting, on hand-made maps and boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from filo.fusion import (
    box_mask,
    box_score_map,
    boxes_to_map,
    fuse_with_boxes,
    position_from_boxes,
)

POS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom",
       "bottom right"]


def _at(cx, cy, score=0.5, matched=True):
    return [[cx - 1, cy - 1, cx + 1, cy + 1]], [score], [matched]


@pytest.mark.parametrize("cx,expected_col", [(0, 0), (172, 0), (172.6, 0), (172.7, 1),
                                             (173, 1), (344, 1), (345, 1), (345.3, 1),
                                             (345.4, 2), (517, 2), (518, 2)])
def test_half_open_grid_columns(cx, expected_col):
    boxes, scores, matched = _at(cx, 259)
    assert position_from_boxes(boxes, scores, matched, POS) == POS[3 + expected_col]


@pytest.mark.parametrize("cy,expected_row", [(172, 0), (173, 1), (344, 1), (345, 1), (345.4, 2)])
def test_half_open_grid_rows(cy, expected_row):
    boxes, scores, matched = _at(100, cy)
    assert position_from_boxes(boxes, scores, matched, POS) == POS[expected_row * 3]


@pytest.mark.parametrize("c,cell", [(0, 0), (172, 0), (173, 1), (344, 1), (345, 2), (517, 2),
                                    (172.5, None), (344.5, None)])
def test_legacy_grid_cells(c, cell):
    boxes, scores, matched = _at(c, c)
    got = position_from_boxes(boxes, scores, matched, POS, legacy_grid=True)
    assert got == (None if cell is None else POS[cell * 3 + cell])


def test_best_counted_box_wins_and_default_centre():
    boxes = [[0, 0, 20, 20], [400, 400, 500, 500], [400, 0, 500, 100]]
    # box 0 has the top score but does not count; box 2 beats box 1
    assert position_from_boxes(boxes, [0.9, 0.4, 0.6], [False, True, True], POS) == "top right"
    assert position_from_boxes(boxes, [0.9, 0.4, 0.6], [False, False, False], POS) == "center"
    assert position_from_boxes([], [], [], POS) == "center"
    assert position_from_boxes([], [], [], POS, legacy_grid=True) == "center"


def test_fuse_inside_outside():
    amap = np.full((6, 8), 0.5, dtype=np.float32)
    out = fuse_with_boxes(amap, [[1.0, 2.0, 4.0, 5.0]], outside_factor=0.7)
    expected = np.full((6, 8), 0.35, dtype=np.float32)
    expected[2:5, 1:4] = 0.5  # rows 2..4, columns 1..3
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-7)
    assert out.dtype == np.float32


def test_fuse_fractional_corners_truncate():
    amap = np.ones((4, 4))
    out = fuse_with_boxes(amap, [[0.9, 0.2, 2.99, 1.5]], outside_factor=0.0)
    expected = np.zeros((4, 4))
    expected[0:1, 0:2] = 1.0
    np.testing.assert_array_equal(out, expected)


def test_fuse_boxes_past_border_are_clamped():
    amap = torch.ones(5, 5)
    out = fuse_with_boxes(amap, torch.tensor([[-3.0, -2.0, 2.0, 2.0], [3.0, 4.0, 9.0, 12.0]]),
                          outside_factor=0.5)
    expected = torch.full((5, 5), 0.5)
    expected[0:2, 0:2] = 1.0   # the research code's negative starts would have emptied this
    expected[4:5, 3:5] = 1.0
    assert torch.equal(out, expected)


def test_fuse_no_box_scales_whole_map_and_factor_one_disables():
    amap = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0))
    out = fuse_with_boxes(amap, [np.zeros((0, 4)), None], outside_factor=0.7)
    assert torch.allclose(out, amap * 0.7)
    same = fuse_with_boxes(amap, [[[0, 0, 1, 1]], []], outside_factor=1.0)
    assert torch.equal(same, amap)


def test_fuse_batched_per_image_boxes():
    amap = np.ones((2, 3, 3))
    out = fuse_with_boxes(amap, [[[0, 0, 1, 1]], [[2, 2, 3, 3]]], outside_factor=0.0)
    assert out[0].sum() == 1 and out[0, 0, 0] == 1
    assert out[1].sum() == 1 and out[1, 2, 2] == 1
    with pytest.raises(ValueError):
        fuse_with_boxes(amap, [[[0, 0, 1, 1]]])


def test_boxes_to_map_non_aspect_resize():
    mapped = boxes_to_map([[100, 50, 200, 150]], image_size=(1000, 500), size=518)
    assert torch.allclose(mapped, torch.tensor([[51.8, 51.8, 103.6, 155.4]], dtype=torch.float64))


def test_box_mask_empty_box():
    assert not box_mask([[3, 3, 3, 5]], 6, 6).any()


def test_box_score_map_hand_values():
    # box A covers cols 1..3, rows 0..1 with 0.4; box B cols 3..4, rows 1..2 with 0.9;
    # pixel (1, 3) is in both -> max; a box past the edge is clamped; empty -> all zero
    boxes = [[1.2, 0.0, 4.0, 2.5], [3.0, 1.0, 9.0, 3.0]]
    got = box_score_map(boxes, [0.4, 0.9], 4, 5)
    expected = np.array([[0, .4, .4, .4, 0],
                         [0, .4, .4, .9, .9],
                         [0, 0, 0, .9, .9],
                         [0, 0, 0, 0, 0]], dtype=np.float32)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    assert (box_score_map(np.zeros((0, 4)), [], 3, 3) == 0).all()
    np.testing.assert_array_equal(box_score_map(boxes, [0.4, 0.9], 4, 5) > 0, box_mask(boxes, 4, 5))
    with pytest.raises(ValueError, match="2 boxes but 1 scores"):
        box_score_map(boxes, [0.4], 4, 5)


def test_legacy_position_uses_printed_scores_and_last_tie():
    # scores 0.456 and 0.451 both print as "0.45": the research code keeps the later box
    boxes = [[0, 0, 20, 20], [400, 400, 420, 420]]
    assert position_from_boxes(boxes, [0.456, 0.451], [True, True], POS) == "top left"
    assert position_from_boxes(boxes, [0.456, 0.451], [True, True], POS,
                               legacy_grid=True) == "bottom right"
    # a really higher printed score still wins, and unmatched boxes never count
    assert position_from_boxes(boxes, [0.47, 0.451], [True, True], POS, legacy_grid=True) == "top left"
    assert position_from_boxes(boxes, [0.456, 0.9], [True, False], POS, legacy_grid=True) == "top left"


# ---- research box geometry (--legacy_box_slices) --------------------------------------------


def test_research_box_corners_are_scaled_normalized_boxes_without_clamping():
    from filo.fusion import research_box_corners

    cxcywh = torch.tensor([[0.01, 0.5, 0.1, 0.2], [0.9, 0.95, 0.4, 0.3]])
    got = research_box_corners(cxcywh, 518)
    # by hand: x1 = cx*518 - w*518/2, x2 = x1 + w*518 (float32)
    expected = torch.tensor([[5.18 - 25.9, 259 - 51.8, 5.18 + 25.9, 259 + 51.8],
                             [466.2 - 103.6, 492.1 - 77.7, 466.2 + 103.6, 492.1 + 77.7]])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert got[0, 0] < 0 and got[1, 2] > 518  # not clamped


def test_legacy_box_slices_on_hand_built_boxes():
    # x1 = -18.4 -> int() -> -18: a Python slice start counted from the end
    h = w = 518
    box = [[-18.4, 100.7, 33.2, 150.9]]
    assert not box_mask(box, h, w, legacy_slices=True).any()  # map[100:150, 500:33] is empty
    clamped = box_mask(box, h, w)
    assert clamped[100:150, 0:33].all() and clamped.sum() == 50 * 33
    # on a narrow map the same start lands inside: columns 40-18=22 .. 32
    m = box_mask([[-18.4, 1.0, 33.2, 3.0]], 5, 40, legacy_slices=True)
    expected = np.zeros((5, 40), dtype=bool)
    expected[1:3, 22:33] = True
    np.testing.assert_array_equal(m, expected)
    # int() truncates toward zero: -0.7 -> 0 (like the clamp); 2.9 -> 2
    np.testing.assert_array_equal(box_mask([[-0.7, -0.2, 2.9, 2.5]], 4, 4, legacy_slices=True),
                                  box_mask([[0, 0, 2, 2]], 4, 4))
    # a corner past the far edge just stops at the edge, like a Python slice
    np.testing.assert_array_equal(box_mask([[2, 1, 600, 3]], 4, 6, legacy_slices=True)[1:3, 2:],
                                  np.ones((2, 4), dtype=bool))


def test_legacy_fusion_scales_an_emptied_box_and_keeps_exact_ones():
    amap = np.full((518, 518), 0.5, dtype=np.float32)
    amap[300, 300] = 1.0  # outside every box: the research code keeps a score of exactly 1.0
    boxes = [[-18.4, 100.7, 33.2, 150.9], [200.0, 200.0, 210.0, 205.0]]
    out = fuse_with_boxes(amap, boxes, outside_factor=0.7, legacy_slices=True)
    expected = np.full((518, 518), 0.35, dtype=np.float32)
    expected[200:205, 200:210] = 0.5
    expected[300, 300] = 1.0
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-7)
    fixed = fuse_with_boxes(amap, boxes, outside_factor=0.7)
    assert fixed[120, 10] == 0.5 and out[120, 10] == np.float32(0.35)
    assert fixed[300, 300] == np.float32(0.7)
    # torch input behaves the same
    torch_out = fuse_with_boxes(torch.from_numpy(amap), boxes, 0.7, legacy_slices=True)
    np.testing.assert_array_equal(torch_out.numpy(), out)
