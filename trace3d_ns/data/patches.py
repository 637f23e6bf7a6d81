"""Instance patching (Trace3D step 1): overlapping 2D masks -> one disjoint patch map per image.

Every pixel is described by the set of masks that cover it. Pixels with the same set form one
*patch* (a patch need not be spatially connected, exactly as in the paper, where a patch is the
index of a unique per-pixel membership vector). Patch ``0`` is the set "covered by no mask" and
counts as background; patches ``1..T`` are numbered compactly in order of first occurrence in a
row-major scan of the image, so the numbering is deterministic and independent of mask order.

Small patches (fewer than ``min_patch_area`` pixels) are mostly slivers where mask boundaries
disagree by a pixel or two. :func:`masks_to_patches` handles them with one of two policies:

- ``"merge"`` (default): a small patch is absorbed by the neighbouring patch (4-connectivity) with
  which it shares the most boundary pixels-pairs; ties go to the neighbour with the smaller id.
  That neighbour may be the background ``0``. Merging runs in rounds (a Boruvka-style pass: every
  small patch picks its best neighbour at once, 2-cycles are broken towards the larger patch) until
  no small patch with a neighbour is left. A small patch that has no neighbour at all (it fills the
  image) is kept.
- ``"background"``: small patches are set to ``0``.

Patch ``0`` itself is never removed for being small: it is not an instance.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence, Tuple, Union

import numpy as np
import torch

SmallPatchPolicy = Literal["merge", "background"]


def _as_numpy_masks(masks: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"Expected masks of shape [K, H, W], got {masks.shape}")
    return masks.astype(bool, copy=False)


def _membership_ids(masks: np.ndarray) -> np.ndarray:
    """Group pixels by the exact set of masks covering them.

    Args:
        masks: [K, H, W] bool.

    Returns:
        [H*W] int64 group ids in 0..G-1 (arbitrary but deterministic numbering).
    """
    K, H, W = masks.shape
    flat = masks.reshape(K, H * W)
    # Pack the membership bits of each pixel into uint8 rows, then group 8 of them into one
    # uint64 word: [ceil(K/64), H*W] words describe every pixel exactly.
    packed = np.packbits(flat, axis=0)  # [ceil(K/8), N] uint8
    n_bytes = packed.shape[0]
    pad = (-n_bytes) % 8
    if pad:
        packed = np.concatenate([packed, np.zeros((pad, H * W), dtype=np.uint8)], axis=0)
    words = np.ascontiguousarray(packed.T).view(np.uint64)  # [N, ceil(K/64)]
    # Exact grouping without hashing: refine the grouping one word at a time with 1-D uniques.
    _, ids = np.unique(words[:, 0], return_inverse=True)
    ids = ids.reshape(-1).astype(np.int64)
    for j in range(1, words.shape[1]):
        uniq_j, inv_j = np.unique(words[:, j], return_inverse=True)
        combined = ids * np.int64(len(uniq_j)) + inv_j.reshape(-1)
        _, ids = np.unique(combined, return_inverse=True)
        ids = ids.reshape(-1).astype(np.int64)
    return ids


def _relabel_first_occurrence(labels: np.ndarray, background: int) -> np.ndarray:
    """Renumber arbitrary non-negative group labels so that ``background`` becomes 0 and the other
    groups become 1..T in order of first occurrence (row-major).

    Args:
        labels: [N] int64 group labels.
        background: label of the background group, or -1 if there is none.

    Returns:
        [N] int32 compact ids.
    """
    uniq, first_idx, inv = np.unique(labels, return_index=True, return_inverse=True)
    inv = inv.reshape(-1)
    order = np.argsort(first_idx, kind="stable")  # unique groups in order of first appearance
    new_id = np.empty(len(uniq), dtype=np.int64)
    is_bg = uniq[order] == background
    # Foreground groups get 1, 2, ... in appearance order; the background group gets 0.
    ranks = np.cumsum(~is_bg)
    new_id[order] = np.where(is_bg, 0, ranks)
    return new_id[inv].astype(np.int32)


def _boundary_counts(labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count 4-connected boundary pixel-pairs between different labels.

    Args:
        labels: [H, W] int labels in 0..n-1.

    Returns:
        (lo, hi, count): undirected label pairs (lo < hi) and how many adjacent pixel pairs they share.
    """
    a = np.concatenate([labels[:, :-1].ravel(), labels[:-1, :].ravel()]).astype(np.int64)
    b = np.concatenate([labels[:, 1:].ravel(), labels[1:, :].ravel()]).astype(np.int64)
    diff = a != b
    a, b = a[diff], b[diff]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    n = np.int64(int(labels.max()) + 1) if labels.size else np.int64(1)
    keys, counts = np.unique(lo * n + hi, return_counts=True)
    return keys // n, keys % n, counts


def _merge_small_patches(patches: np.ndarray, min_patch_area: int) -> np.ndarray:
    """Absorb patches smaller than ``min_patch_area`` into their longest-boundary neighbour.

    Args:
        patches: [H, W] int32 compact patch ids (0 = background).

    Returns:
        [H, W] int64 labels (not compact; caller relabels).
    """
    labels = patches.astype(np.int64)
    while True:
        n = int(labels.max()) + 1
        area = np.bincount(labels.ravel(), minlength=n)
        small = (area > 0) & (area < min_patch_area)
        small[0] = False  # background is never "small"
        if not small.any():
            return labels
        lo, hi, cnt = _boundary_counts(labels)
        if len(cnt) == 0:
            return labels
        # Directed edges src -> dst for small sources only.
        src = np.concatenate([lo, hi])
        dst = np.concatenate([hi, lo])
        w = np.concatenate([cnt, cnt])
        edge_key = np.concatenate([lo * n + hi, lo * n + hi])  # shared id of the undirected edge
        keep = small[src]
        if not keep.any():
            return labels  # every small patch is isolated (fills the image)
        src, dst, w, edge_key = src[keep], dst[keep], w[keep], edge_key[keep]
        # Best edge per source: most boundary, then smallest undirected key (a strict total order on
        # edges, so following best edges can only produce 2-cycles, never longer ones).
        order = np.lexsort((edge_key, -w, src))
        src, dst = src[order], dst[order]
        first = np.ones(len(src), dtype=bool)
        first[1:] = src[1:] != src[:-1]
        parent = np.arange(n, dtype=np.int64)
        parent[src[first]] = dst[first]
        # Break 2-cycles a <-> b: the larger patch (then the smaller id) stays a root.
        idx = np.arange(n)
        mutual = (parent[parent] == idx) & (parent != idx)
        a_idx = idx[mutual]
        b_idx = parent[a_idx]
        a_wins = (area[a_idx] > area[b_idx]) | ((area[a_idx] == area[b_idx]) & (a_idx < b_idx))
        parent[a_idx[a_wins]] = a_idx[a_wins]
        # Pointer jumping to the roots.
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
        new_labels = parent[labels]
        if np.array_equal(new_labels, labels):
            return labels
        labels = new_labels


def masks_to_patches(
    masks: Union[np.ndarray, torch.Tensor],
    min_patch_area: int = 0,
    small_patch_policy: SmallPatchPolicy = "merge",
) -> np.ndarray:
    """Turn K possibly-overlapping masks into a disjoint patch map.

    Args:
        masks: [K, H, W] bool masks (numpy or torch). K may be 0.
        min_patch_area: patches with fewer pixels are handled by ``small_patch_policy``
            (0 or 1 disables it).
        small_patch_policy: ``"merge"`` into the neighbour sharing the most boundary, or
            ``"background"`` to set them to 0 (see the module docstring).

    Returns:
        [H, W] int32 patch ids: 0 = covered by no mask, 1..T compact, numbered in order of first
        occurrence in a row-major scan.
    """
    masks = _as_numpy_masks(masks)  # [K, H, W]
    K, H, W = masks.shape
    if K == 0 or H * W == 0:
        return np.zeros((H, W), dtype=np.int32)
    groups = _membership_ids(masks)  # [H*W]
    uncovered = ~masks.any(axis=0).reshape(-1)  # [H*W]
    background = int(groups[np.argmax(uncovered)]) if uncovered.any() else -1
    patches = _relabel_first_occurrence(groups, background).reshape(H, W)  # [H, W]

    if min_patch_area > 1:
        if small_patch_policy == "merge":
            merged = _merge_small_patches(patches, min_patch_area)
            patches = _relabel_first_occurrence(merged.reshape(-1), 0).reshape(H, W)
        elif small_patch_policy == "background":
            area = np.bincount(patches.ravel())
            small = area < min_patch_area
            small[0] = False
            out = np.where(small[patches], 0, patches)
            patches = _relabel_first_occurrence(out.reshape(-1).astype(np.int64), 0).reshape(H, W)
        else:
            raise ValueError(f"Unknown small_patch_policy {small_patch_policy!r}")
    return patches.astype(np.int32, copy=False)


def patch_mask_alike(masks: Union[np.ndarray, torch.Tensor], patches: np.ndarray) -> np.ndarray:
    """Which patches of a view one mask covers together: [T + 1, T + 1] uint8, 1 where patches p, q
    > 0 share a mask covering more than half of each one's pixels (1 on the diagonal, 0 for patch 0).

    A patch is the set of masks over its pixels, so the ids forget that SAM gave a whole over two of
    its parts, or one mask over two touching objects: ``MergeConfig.alike_by_masks`` lets within-view
    merging count such patches of another view as alike. ``patches`` is ``masks_to_patches``' map of
    the same masks (small patches merged in keep the masks of the most of their pixels)."""
    masks = _as_numpy_masks(masks)  # [K, H, W]
    T = int(patches.max()) if patches.size else 0
    alike = np.zeros((T + 1, T + 1), dtype=np.uint8)
    if T == 0:
        return alike
    flat = patches.reshape(-1).astype(np.int64)  # [H*W]
    area = np.bincount(flat, minlength=T + 1)  # [T + 1]
    if masks.shape[0]:
        covered = np.stack([np.bincount(flat, weights=m.reshape(-1), minlength=T + 1) for m in masks])  # [K, T + 1]
        member = covered > 0.5 * area[None, :]  # [K, T + 1] mask k covers most of patch p
        member[:, 0] = False
        alike = (member.T.astype(np.int64) @ member.astype(np.int64) > 0).astype(np.uint8)  # [T + 1, T + 1]
    idx = np.arange(1, T + 1)
    alike[idx, idx] = 1
    return alike


def masks_span_patches(alike: Sequence[Optional[np.ndarray]]) -> bool:
    """Whether some view has a mask over most of two of its patches (``patch_mask_alike`` matrices,
    None for a view without one). False when every view's masks partition it, as the ``levels``
    source's do: its patches are then each one mask, and nothing in them tells an object's parts
    from two objects."""
    for matrix in alike:
        if matrix is None:
            continue
        inner = np.asarray(matrix)[1:, 1:] > 0  # [T, T] the object patches
        if int(inner.sum()) > int(np.trace(inner)):
            return True
    return False


def patch_downscale_size(height: int, width: int, factor: int) -> Tuple[int, int]:
    """Output size splatfacto trains at for a downscale factor: ``resize_image`` (a stride-d box
    filter) and ``Cameras.rescale_output_resolution(1/d)`` both give ``(H // d, W // d)``."""
    return height // factor, width // factor


def splatfacto_downscale_factor(step: int, num_downscales: int, resolution_schedule: int) -> int:
    """The factor ``SplatfactoModel._get_downscale_factor`` uses while training."""
    return 2 ** max(num_downscales - step // resolution_schedule, 0)


def downscale_patches(
    patches: Union[np.ndarray, torch.Tensor], size_or_factor: Union[int, Tuple[int, int]]
) -> Union[np.ndarray, torch.Tensor]:
    """Nearest-neighbour downscaling of a patch map that never invents ids.

    With an integer factor ``d`` the output is ``[H // d, W // d]``, the size splatfacto renders and
    downsizes the ground-truth image to (``resize_image`` averages the d x d block
    ``[i*d:(i+1)*d, j*d:(j+1)*d]``); each output pixel takes the id of that block's centre pixel
    ``(i*d + d//2, j*d + d//2)``. With an explicit ``(h, w)`` the source pixel is
    ``floor((i + 0.5) * H / h)``.

    Args:
        patches: [H, W] integer ids (numpy or torch; the type is preserved).
        size_or_factor: an integer factor >= 1 or a target ``(h, w)``.

    Returns:
        [h, w] ids, same type and dtype as the input.
    """
    H, W = int(patches.shape[0]), int(patches.shape[1])
    if isinstance(size_or_factor, (int, np.integer)):
        d = int(size_or_factor)
        if d < 1:
            raise ValueError(f"Downscale factor must be >= 1, got {d}")
        if d == 1:
            return patches
        h, w = patch_downscale_size(H, W, d)
        rows = np.arange(h) * d + d // 2
        cols = np.arange(w) * d + d // 2
    else:
        h, w = int(size_or_factor[0]), int(size_or_factor[1])
        if h < 1 or w < 1:
            raise ValueError(f"Target size must be positive, got {(h, w)}")
        rows = np.minimum(((np.arange(h) + 0.5) * H / h).astype(np.int64), H - 1)
        cols = np.minimum(((np.arange(w) + 0.5) * W / w).astype(np.int64), W - 1)
    if isinstance(patches, torch.Tensor):
        r = torch.from_numpy(rows).to(patches.device)
        c = torch.from_numpy(cols).to(patches.device)
        return patches[r][:, c]
    return patches[rows][:, cols]
