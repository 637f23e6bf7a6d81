"""Instance patching and patch downscaling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trace3d_ns.data.patches import (
    downscale_patches,
    masks_to_patches,
    patch_downscale_size,
    splatfacto_downscale_factor,
)

torch.set_num_threads(1)


def _two_overlapping_masks() -> np.ndarray:
    """A (rows 0-3, cols 0-5) and B (rows 2-5, cols 3-7) on an 8x8 image."""
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 0:4, 0:6] = True
    masks[1, 2:6, 3:8] = True
    return masks


def test_exact_partition_of_two_overlapping_masks():
    masks = _two_overlapping_masks()
    patches = masks_to_patches(masks)
    assert patches.dtype == np.int32 and patches.shape == (8, 8)
    # First occurrence in row-major order: A only at (0,0) -> 1; A&B at (2,3) -> 2; B only at (2,6) -> 3.
    expected = np.zeros((8, 8), dtype=np.int32)
    expected[0:4, 0:6] = 1
    expected[2:4, 3:6] = 2
    expected[2:4, 6:8] = 3
    expected[4:6, 3:8] = 3
    np.testing.assert_array_equal(patches, expected)


def test_patch_zero_is_uncovered_even_if_it_appears_late():
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, :3, :] = True  # uncovered pixels only in the last row
    patches = masks_to_patches(masks)
    assert (patches[:3] == 1).all() and (patches[3] == 0).all()


def test_fully_covered_image_has_no_background():
    masks = np.ones((2, 4, 4), dtype=bool)
    masks[1, :, 2:] = False
    patches = masks_to_patches(masks)
    assert set(np.unique(patches).tolist()) == {1, 2}


def test_patches_are_disjoint_membership_classes_for_many_masks():
    rng = np.random.default_rng(0)
    H, W, K = 40, 50, 130  # > 64 masks: several packed words per pixel
    yy, xx = np.mgrid[:H, :W]
    masks = np.zeros((K, H, W), dtype=bool)
    for k in range(K):
        cy, cx, r = rng.integers(0, H), rng.integers(0, W), rng.integers(3, 15)
        masks[k] = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    masks[:, 30:, 40:] = False  # some uncovered pixels
    patches = masks_to_patches(torch.from_numpy(masks))
    membership = masks.reshape(K, -1).T  # [N, K]
    _, ref = np.unique(membership, axis=0, return_inverse=True)
    ref = ref.reshape(-1)
    # Same partition: the pairs (reference class, patch id) are a bijection.
    pairs = set(zip(ref.tolist(), patches.reshape(-1).tolist()))
    ids = np.unique(patches)
    assert len(pairs) == len(np.unique(ref)) == len(ids)
    # Compact ids: 0 (uncovered pixels exist here) and 1..T without gaps.
    assert (~masks.any(0)).any()
    np.testing.assert_array_equal(ids, np.arange(len(ids)))
    # Numbered by first occurrence in row-major order.
    flat = patches.reshape(-1)
    first = np.array([np.argmax(flat == i) for i in ids[1:]])
    assert (np.diff(first) > 0).all()


def test_order_of_masks_does_not_change_the_patch_map():
    masks = _two_overlapping_masks()
    np.testing.assert_array_equal(masks_to_patches(masks), masks_to_patches(masks[::-1].copy()))


def test_no_masks_gives_all_background():
    patches = masks_to_patches(np.zeros((0, 5, 7), dtype=bool))
    assert patches.shape == (5, 7) and not patches.any()


def _sliver_masks() -> np.ndarray:
    """Two big masks whose borders disagree: a 1-pixel-wide sliver covered by both at col 4."""
    masks = np.zeros((2, 6, 10), dtype=bool)
    masks[0, :, 0:5] = True
    masks[1, :, 4:10] = True
    masks[1, 0, 4] = False  # make the sliver a bit irregular: (0,4) is A only
    return masks


def test_min_area_merge_absorbs_sliver_into_neighbour_with_longest_boundary():
    masks = _sliver_masks()
    raw = masks_to_patches(masks)
    assert raw.max() == 3  # A only, A&B sliver, B only
    # Sliver (A&B) = col 4, rows 1-5: 5 pixels. Boundary with A: 5 (left) + 1 (up, (0,4) is A) = 6,
    # with B: 5 (right) -> merged into A.
    merged = masks_to_patches(masks, min_patch_area=6, small_patch_policy="merge")
    assert merged.max() == 2
    assert (merged[:, :5] == merged[0, 0]).all()
    assert (merged[:, 5:] == merged[0, 9]).all()
    assert merged[0, 0] != merged[0, 9]
    # Threshold at or below the sliver's area keeps it.
    assert masks_to_patches(masks, min_patch_area=5).max() == 3


def test_min_area_background_policy_sets_small_patches_to_zero_and_recompacts():
    masks = _sliver_masks()
    out = masks_to_patches(masks, min_patch_area=6, small_patch_policy="background")
    assert (out[1:, 4] == 0).all()
    assert set(np.unique(out).tolist()) == {0, 1, 2}


def test_merge_can_go_into_background_and_chains_of_small_patches_resolve():
    masks = np.zeros((3, 10, 10), dtype=bool)
    masks[0, 2:4, 2:4] = True  # 4 px island in background
    masks[1, 6:9, 1:9] = True  # 24 px
    masks[2, 6:9, 8:9] = True  # 3 px sliver (1&2) on mask 1's right edge
    masks[2, 7, 3:5] = True  # 2 px (1&2) inside mask 1: same membership, same patch (5 px in total)
    assert masks_to_patches(masks).max() == 3
    out = masks_to_patches(masks, min_patch_area=6)
    # The island borders only background -> 0. The 1&2 patch (5 px) shares 3 + 6 = 9 boundary pairs
    # with mask 1's patch and 3 + 2 = 5 with the background -> it joins mask 1's patch.
    assert (out[2:4, 2:4] == 0).all()
    assert (out[6:9, 1:9] == 1).all()
    assert out.max() == 1
    # Every remaining non-zero patch is at least min_patch_area pixels.
    rng = np.random.default_rng(1)
    many = rng.random((6, 30, 30)) > 0.5  # salt-and-pepper: lots of tiny patches
    out = masks_to_patches(many, min_patch_area=20)
    areas = np.bincount(out.ravel())
    assert (areas[1:] >= 20).all() and areas.sum() == 900
    assert set(np.unique(out).tolist()) >= set(range(1, int(out.max()) + 1))  # still compact


def test_whole_image_single_small_patch_is_kept():
    out = masks_to_patches(np.ones((1, 3, 3), dtype=bool), min_patch_area=100)
    assert (out == 1).all()


def test_bad_policy_raises():
    with pytest.raises(ValueError):
        masks_to_patches(_sliver_masks(), min_patch_area=6, small_patch_policy="nope")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Downscaling
# ------------------------------------------------------------------------------------------------


def test_downscale_size_matches_splatfacto_resize_image():
    from nerfstudio.models.splatfacto import resize_image

    for H, W, d in [(300, 400, 2), (375, 500, 8), (31, 33, 4)]:
        img = torch.zeros(H, W, 3)
        assert tuple(resize_image(img, d).shape[:2]) == patch_downscale_size(H, W, d)
        p = torch.zeros(H, W, dtype=torch.int32)
        assert tuple(downscale_patches(p, d).shape) == (H // d, W // d)


def test_downscale_keeps_ids_with_nearest_semantics():
    rng = np.random.default_rng(2)
    patches = rng.integers(0, 50, size=(37, 45)).astype(np.int32)
    small = downscale_patches(patches, 4)
    assert small.shape == (9, 11) and small.dtype == np.int32
    assert set(np.unique(small).tolist()) <= set(np.unique(patches).tolist())
    # Each output pixel is the centre pixel (i*d + d//2) of its d x d block.
    for i in range(9):
        for j in range(11):
            assert small[i, j] == patches[i * 4 + 2, j * 4 + 2]
    # Torch in -> torch out, same values.
    t = downscale_patches(torch.from_numpy(patches), 4)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int32
    np.testing.assert_array_equal(t.numpy(), small)
    assert downscale_patches(patches, 1) is patches


def test_downscale_to_explicit_size_and_block_structure():
    # A block image: each 4x4 block has one id; any nearest sampler must return the block ids exactly.
    blocks = np.arange(12, dtype=np.int32).reshape(3, 4)
    big = np.kron(blocks, np.ones((4, 4), dtype=np.int32))  # [12, 16]
    np.testing.assert_array_equal(downscale_patches(big, (3, 4)), blocks)
    np.testing.assert_array_equal(downscale_patches(big, 4), blocks)
    up = downscale_patches(blocks, (6, 8))  # works as nearest upsampling too
    np.testing.assert_array_equal(up, np.kron(blocks, np.ones((2, 2), dtype=np.int32)))


def test_splatfacto_downscale_factor():
    assert splatfacto_downscale_factor(0, 2, 3000) == 4
    assert splatfacto_downscale_factor(3000, 2, 3000) == 2
    assert splatfacto_downscale_factor(10000, 2, 3000) == 1


def test_patch_mask_alike_marks_the_patches_one_mask_covers():
    from trace3d_ns.data.patches import masks_to_patches, patch_mask_alike

    masks = np.zeros((3, 4, 6), dtype=bool)
    masks[0, :, :4] = True  # a whole over two parts
    masks[1, :, :2] = True  # its left part
    masks[2, :, 4:] = True  # another object
    patches = masks_to_patches(masks)  # [[1 1 2 2 3 3], ...]
    alike = patch_mask_alike(masks, patches)
    expected = np.array([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]], dtype=np.uint8)
    assert np.array_equal(alike, expected)
    # overlapping masks of two objects: each patch is alike to those sharing one of its masks
    masks[2, :, 3:] = True  # the other object now overlaps the whole's last column
    patches = masks_to_patches(masks)  # [[1 1 2 3 4 4], ...]: {W, P}, {W}, {W, X}, {X}
    alike = patch_mask_alike(masks, patches)
    expected = np.array(
        [[0, 0, 0, 0, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 0, 1, 1]], dtype=np.uint8
    )
    assert np.array_equal(alike, expected)
    assert np.array_equal(patch_mask_alike(np.zeros((0, 4, 6), dtype=bool), np.zeros((4, 6), np.int32)), np.zeros((1, 1)))


def test_masks_span_patches_only_when_a_mask_covers_two_patches_of_a_view():
    from trace3d_ns.data.patches import masks_span_patches, masks_to_patches, patch_mask_alike

    partition = np.zeros((3, 4, 6), dtype=bool)
    partition[0, :, :2], partition[1, :, 2:4], partition[2, :, 4:] = True, True, True  # one mask per pixel
    nested = partition.copy()
    nested[0, :, :4] = True  # the first mask now a whole over the second's part
    alike = {name: patch_mask_alike(m, masks_to_patches(m)) for name, m in (("partition", partition), ("nested", nested))}
    assert not masks_span_patches([alike["partition"], None, alike["partition"]])
    assert masks_span_patches([alike["partition"], alike["nested"]])
    assert not masks_span_patches([None, None]) and not masks_span_patches([])
