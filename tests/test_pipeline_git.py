"""Gaussian Instance Tracing inside training: per-Gaussian buffers through densification, and
the pipeline stage that installs consistent maps as training labels."""

from pathlib import Path

import pytest
import torch

from tests.test_method import _model


class _DuplicateFirstHalf:
    """A strategy stand-in that densifies with gsplat's own `duplicate` op."""

    absgrad = False

    def step_post_backward(self, params, optimizers, state, step, info, packed=False):
        from gsplat.strategy.ops import duplicate

        n = params["means"].shape[0]
        duplicate(params, optimizers, state, torch.arange(n) < n // 2)


def test_instance_buffers_follow_densification():
    from nerfstudio.engine.optimizers import Optimizers
    from trace3d_ns.config import trace3d_trainer_config

    model = _model(None)
    n = model.num_points
    optimizers = Optimizers(trace3d_trainer_config().optimizers, model.get_param_groups())
    model.step_cb(optimizers, 0)
    labels = torch.arange(n) % 7
    model.set_instances(labels, torch.linspace(0, 1, n))
    model.strategy = _DuplicateFirstHalf()
    model.info = {}
    model.step_post_backward(0)
    assert model.num_points == n + n // 2
    assert torch.equal(model.instance_labels, torch.cat([labels, labels[: n // 2]]))
    assert model.instance_confidence.shape == (model.num_points,)
    assert "instance_labels" not in model.strategy_state  # only carried during the step


def test_set_instances_checks_shapes():
    model = _model(None)
    with pytest.raises(ValueError, match="expected"):
        model.set_instances(torch.zeros(3, dtype=torch.long), torch.zeros(3))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from trace3d_ns.config import trace3d_trainer_config
    from trace3d_ns.scene.generate import SceneSpec, generate_scene

    root = tmp_path_factory.mktemp("git")
    scene = generate_scene(root / "scene", SceneSpec(num_objects=3, num_views=10, image_size=48, num_points=3000, sam_like_masks=True))
    cfg = trace3d_trainer_config().pipeline
    cfg.datamanager.dataparser.data = Path(scene)
    cfg.datamanager.mask_source = "folder"
    cfg.datamanager.folder.directory = Path("sam_masks")
    cfg.model.num_downscales = 0
    return cfg.setup(device="cpu", test_mode="val")


def test_instance_tracing_labels_gaussians_and_feeds_training(pipeline):
    result = pipeline.run_instance_tracing(step=0)
    model = pipeline.model
    assert model.instance_labels.shape == (model.num_points,)
    # untrained random Gaussians: most lie where no mask is, and patch 0 votes for id 0
    assert (model.instance_labels > 0).sum() > 0.1 * model.num_points
    assert result.stats.num_instances >= 2
    maps = pipeline.datamanager.train_patch_maps()
    assert len(result.maps) == len(maps) and result.maps[0].shape == maps[0].shape
    _, batch = pipeline.datamanager.next_train(0)
    assert "instances" in batch and batch["instances"].dtype == torch.int32
    assert batch["instances"].shape == batch["patches"].shape
    # labels are global: the same id appears in several views
    ids_per_view = [set(m.unique().tolist()) - {0} for m in result.maps]
    assert any(len(a & b) > 0 for a, b in zip(ids_per_view, ids_per_view[1:]))
    cached = list(Path(pipeline.datamanager.mask_cache.root).glob("consistent-*"))
    assert len(cached) == 1


def test_instance_tracing_hands_the_masks_alike_matrices_to_merging_when_asked(pipeline, monkeypatch):
    import trace3d_ns.git.merging as merging

    seen = {}
    original = merging.consistent_instances

    def spy(traces, patch_maps, config=None, alike=None):
        seen["alike"], seen["config"] = alike, config
        return original(traces, patch_maps, config, alike)

    monkeypatch.setattr(merging, "consistent_instances", spy)
    merge = pipeline.config.merge
    monkeypatch.setattr(merge, "alike_by_masks", True)
    pipeline.run_instance_tracing(step=0)
    maps = pipeline.datamanager.train_patch_maps()
    assert seen["config"].alike_by_masks and len(seen["alike"]) == len(maps)
    for m, a in zip(maps, seen["alike"]):
        assert a.shape == (int(m.max()) + 1,) * 2
    monkeypatch.setattr(merge, "alike_by_masks", False)
    pipeline.run_instance_tracing(step=0)
    assert seen["alike"] is None


def test_the_raw_patch_share_needs_masks_that_span_patches(pipeline, tmp_path, monkeypatch):
    """At its first training step the pipeline tells the model whether some mask covers two patches
    of a view (SAM's wholes over parts): the SAM-like masks do, the ``levels`` source's partitions do
    not, and then ``contrastive_raw_weight`` is not applied."""
    from nerfstudio.engine.optimizers import Optimizers
    from trace3d_ns.config import trace3d_trainer_config

    def first_step(p):
        p.model.train()
        p.model.step_cb(Optimizers(trace3d_trainer_config().optimizers, p.get_param_groups()), 0)
        p.get_train_loss_dict(0)

    monkeypatch.setattr(pipeline.model.config, "contrastive_raw_weight", 0.5)
    first_step(pipeline)
    assert pipeline.model.masks_span_patches

    cfg = trace3d_trainer_config().pipeline
    cfg.datamanager.dataparser.data = pipeline.datamanager.config.dataparser.data
    cfg.datamanager.mask_source = "levels"
    cfg.datamanager.cache_dir = tmp_path / "cache"
    cfg.model.num_downscales = 0
    cfg.model.contrastive_raw_weight = 0.5
    levels = cfg.setup(device="cpu", test_mode="val")
    assert levels.model.masks_span_patches  # unknown until the first step
    first_step(levels)
    assert not levels.model.masks_span_patches
