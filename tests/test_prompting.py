"""Online self-prompting on a perfect-geometry scene (Gaussians on the generator's meshes)."""

import numpy as np
import pytest
import torch

from trace3d_ns.prompting import PatchPromptMasker, SamPromptMasker, SelfPromptConfig, self_prompt, spread_prompts
from trace3d_ns.rendering import contributions


@pytest.fixture(scope="module")
def scene():
    from trace3d_ns.git.surface_gaussians import surface_scene
    from trace3d_ns.scene.generate import SceneSpec

    # at 96 px the boundary band, where discs spill past the silhouette, weighs less than at 48 px
    return surface_scene(SceneSpec(num_objects=3, num_views=12, image_size=96, seed=3))


def _provider(s):
    cache = {}

    def view_contributions(v):
        if v not in cache:
            cache[v] = contributions(s.means, s.quats, s.scales, s.opacities, s.viewmats[v], s.Ks[v], s.width, s.height)
        return cache[v]

    return view_contributions


def _centres(s):
    return torch.linalg.inv(s.viewmats)[:, :3, 3]


def _point_on(gt, obj):
    ys, xs = torch.nonzero(gt == obj, as_tuple=True)
    i = len(xs) // 2
    return float(xs[i]), float(ys[i])


def _iou(a, b):
    return float((a & b).sum()) / float((a | b).sum())


def test_a_prompt_in_one_view_recovers_the_object(scene):
    s = scene
    gt = s.gt_instances
    masker = PatchPromptMasker([g.int() for g in gt])  # exact object masks
    obj = int(torch.bincount(gt[0].reshape(-1))[1:].argmax()) + 1  # the largest object in view 0
    result = self_prompt(
        _provider(s), s.num_gaussians, masker, 0, [_point_on(gt[0], obj)],
        views=range(len(gt)), camera_centres=_centres(s),
    )
    seen = result.total >= SelfPromptConfig().min_total_weight  # nothing can recover never-seen Gaussians
    truth = (s.instance_ids == obj) & seen
    assert seen[s.instance_ids == obj].float().mean() > 0.5
    assert _iou(result.selected, truth) > 0.9
    assert len(result.order) >= 3  # prompts were propagated to other views
    on_object = [int(gt[v][y, x]) == obj for v in result.order for x, y in result.prompts[v]]
    assert np.mean(on_object) >= 0.9  # propagated prompts land on the object (a few on its rim may not)


def test_negative_points_and_errors(scene):
    s = scene
    gt = s.gt_instances
    masker = PatchPromptMasker([g.int() for g in gt])
    obj = int(gt[0][gt[0] > 0].mode().values)
    p = _point_on(gt[0], obj)
    with pytest.raises(ValueError, match="empty mask"):  # the same point as positive and negative
        self_prompt(_provider(s), s.num_gaussians, masker, 0, [p], [p])
    with pytest.raises(ValueError, match="at least one positive"):
        self_prompt(_provider(s), s.num_gaussians, masker, 0, [])


def test_prompts_are_confident_and_spread():
    prob = torch.zeros(40, 40)
    prob[5:15, 5:15] = 0.9
    prob[10, 10] = 1.0
    prob[30, 30] = 0.95
    pts = spread_prompts(prob, 3, 0.8, radius_px=6)
    assert pts[0] == (10, 10) and pts[1] == (30, 30)
    assert all(prob[y, x] >= 0.8 for x, y in pts)
    assert all(np.hypot(a[0] - b[0], a[1] - b[1]) > 6 for i, a in enumerate(pts) for b in pts[i + 1 :])
    assert spread_prompts(prob, 3, 0.99, 6) == [(10, 10)]


def test_sam_masker_runs_with_a_tiny_random_sam():
    from segment_anything import SamPredictor

    from trace3d_ns.data.mask_sources import build_tiny_random_sam

    images = [np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)]
    masker = SamPromptMasker(SamPredictor(build_tiny_random_sam()), images)
    mask = masker(0, [(10, 20)], [(50, 5)])
    assert mask.shape == (48, 64) and mask.dtype == torch.bool
