"""Trace3DModel: splatfacto on any device, rendering through `trace3d_ns.rendering`.

Differences from `SplatfactoModel`: no `.cuda()` (everything follows the model's device), the
rasterizer backend is a config field (by default gsplat on CUDA, its kernels checked at start-up,
and the compiled kernels on the CPU), LPIPS is only built when its weights are already on disk, and
the viewer's outputs start with `rgb` (nerfstudio's viewer opens on the first key).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Tuple, Type, Union

import torch
from gsplat.strategy import DefaultStrategy
from torch import Tensor
from torch.nn import Parameter

from nerfstudio.cameras.cameras import Cameras
from nerfstudio.models.splatfacto import (
    RGB2SH,
    SplatfactoModel,
    SplatfactoModelConfig,
    num_sh_bases,
    random_quat_tensor,
)
from nerfstudio.utils.colors import get_color
from trace3d_ns.data.patches import downscale_patches
from trace3d_ns.device import keep_freed_host_memory, require_device, require_gsplat_cuda
from trace3d_ns.features.contrastive import contrastive_loss, sample_labelled_pixels
from trace3d_ns.features.pca import FeaturePCA
from trace3d_ns.metrics import offline_lpips
from trace3d_ns.rendering import rasterize, rasterize_with_extra


def get_viewmat(camera_to_world: Tensor) -> Tensor:
    """gsplat's world-to-camera matrices [C, 4, 4] of nerfstudio's camera-to-world poses [C, 3, 4]
    (y and z flipped, rigid inverse). splatfacto's own `get_viewmat` is wrapped in torch.compile:
    the viewer's render interrupt can land inside its first compilation and kill the render
    thread for good, and compiling it buys nothing for a 4x4 matrix."""
    R = camera_to_world[:, :3, :3] * camera_to_world.new_tensor([1.0, -1.0, -1.0])  # [C, 3, 3]
    T = camera_to_world[:, :3, 3:4]  # [C, 3, 1]
    R_inv = R.transpose(1, 2)
    viewmat = torch.zeros(R.shape[0], 4, 4, device=R.device, dtype=R.dtype)
    viewmat[:, 3, 3] = 1.0
    viewmat[:, :3, :3] = R_inv
    viewmat[:, :3, 3:4] = -torch.bmm(R_inv, T)
    return viewmat


@dataclass
class Trace3DModelConfig(SplatfactoModelConfig):
    """Gaussian splatting with Gaussian Instance Tracing, on CUDA (gsplat) or the CPU (compiled kernels)."""

    _target: Type = field(default_factory=lambda: Trace3DModel)
    feature_dim: int = 16
    """Dimension of the instance feature lifted onto each Gaussian (0 disables the feature field)."""
    feature_start_step: int = 1000
    """Step from which features are rendered and trained (after the RGB warm-up)."""
    contrastive_weight: float = 0.1
    """Weight of the contrastive loss on rendered features."""
    contrastive_samples: int = 1024
    """Labelled pixels sampled per step for the contrastive loss. Its cost grows with the square:
    forward + backward on one CPU thread took 0.06 s at 1024, 0.33 s at 2048 and 1.5-1.8 s at 4096
    samples (more than a whole compiled training step at 1024)."""
    contrastive_unlabelled_samples: int = 256
    """Pixels no mask covers (label 0) sampled per step besides ``contrastive_samples``, as negatives
    only: the features rendered there are pushed away from every object's, so background Gaussians
    seen only there do not take the feature of an object they border (and get extracted with it).
    0 = only labelled pixels are sampled. Measured on the cluttered 160 px generated scene (seed 0,
    ``full`` variant of the ablation, feature selection), amodal object IoU / boundary IoU: 0.827 /
    0.733 without; 0.830 / 0.735 with 256 alone (the consistent maps still gave background pixels an
    object's id there); 0.875 / 0.777 with 256 and ``merge.unmasked_min_share`` 0.5, which leaves
    those pixels at 0."""
    contrastive_balanced: bool = False
    """Sample the contrastive loss's labelled pixels as evenly over the view's instances as their sizes
    allow, instead of uniformly over the pixels (with 1024 samples of a 160 px view a thin rod of 100
    pixels gets about 4 uniformly). Measured on the cluttered ablation scenes (``full`` continued from
    the same RGB stages, 3 seeds): amodal object IoU 0.805 -> 0.784 with feature selection, novel-view
    mIoU 0.817 -> 0.751; some thin or small objects gain (0.231 -> 0.364, 0.477 -> 0.621), others lose
    more (0.689 -> 0.237): the large objects' features, sampled less, separate less well. A repeat of
    uniform sampling on another random path gave 0.793 / 0.791. Off by default
    (docs/benchmarks/pilot/README.md)."""
    contrastive_min_per_instance: int = 0
    """With `contrastive_balanced` off: every instance of the view first gets this many of the loss's
    labelled samples (all its pixels when it has fewer), the rest uniform. A thin object then has
    positives in every step while large objects keep most of their uniform share; 0: uniform."""
    contrastive_alike_by_masks: bool = True
    """While the features learn from the raw patches (before GIT's consistent maps, or without
    them), two patches of a view that one mask covers together (``data["patch_alike"]``: a whole
    object over its parts, or one mask over touching objects) are not each other's negatives in the
    contrastive loss. Without it the loss pushes an object's parts apart in every view where the
    masks also split it, and only GIT's consistent maps tie them again. Consistent maps are used
    as they are. On the cluttered ablation scenes (SAM-like masks, seed 0) 63% of the pixel pairs
    of one object in different patches share a mask, against 2.7% of the pairs of two objects;
    with it, the raw-patch variants of the ablation (3 seeds, same RGB stages and geometry) went
    from 0.716 to 0.731 (``no_git``) and 0.741 to 0.790 (``density_only``) amodal object IoU,
    novel-view mIoU 0.678 / 0.665 to 0.775 / 0.775 (docs/benchmarks/pilot/README.md)."""
    contrastive_raw_weight: float = 0.0
    """Once the features learn from consistent maps, this share of the contrastive loss still learns
    from the raw patches at the same samples (with ``contrastive_alike_by_masks``): the loss is
    (1 - w) L(consistent ids) + w L(raw patches). Where merging lost an object to a neighbour (a
    thin rod whose masks are mostly a box's), the views whose patches still separate them keep
    its feature apart. Applied only with masks that overlap (SAM's wholes over their parts:
    ``Trace3DModel.masks_span_patches``); with masks that partition each view (``levels``) the raw
    patches are often parts of one object (at 0.5, DTU scan 37's 3-point feature selection fell
    from 0.959 to 0.688 foreground mIoU). Off by default: at 0.5 the ``full`` variant's amodal
    object IoU rose on the three benchmark scenes it was designed on (+1.1 / +4.5 / +5.5 points)
    but fell on the two held-out ones (-2.4 / -2.1; novel-view mIoU -3.5 / -3.0), see
    docs/benchmarks/pilot/README.md. 0: the consistent ids alone."""
    contrastive_temperature: float = 1.0
    """tau in the logits -tau * ||f_u - f_u'||^2 of the contrastive loss.
    Measured on a trained 64 px scene, 300 feature-only steps: at tau = 100 no instance separated (the loss
    is ~0 once each sample's nearest neighbours share its label); at tau = 1, 5 of 6 instances had their
    nearest 10% of other-instance Gaussians beyond twice their own median spread."""
    selection_views: int = 64
    """Training views (spread evenly; 0 = all) whose rendered features are traced back onto the
    Gaussians for feature-similarity selection (see ``trace3d_ns.features.backprojection``)."""
    selection_refresh_steps: int = 500
    """While training, the selection features (see ``selection_views``) are recomputed at most every
    this many steps, and when the number of Gaussians changes: every optimizer step changes their
    inputs, and recomputing them renders ``selection_views`` views under the viewer's training lock.
    Outside training they are recomputed whenever the Gaussians change."""
    feature_grad_to_geometry: bool = False
    """Whether the contrastive loss may move means, scales, rotations and opacities (and add to the
    screen-space gradients densification reads, on every backend)."""
    rasterizer: Literal["auto", "gsplat", "compiled", "torch"] = "auto"
    """Rasterizer backend. auto: gsplat's kernels on CUDA, the compiled (numba) tile kernels on the
    CPU (with the loss's SSIM compiled too); compiled / gsplat: force one (CPU / CUDA only); torch:
    the tile-based torch rasterizer and pytorch_msssim, the reference (slower). Without numba,
    compiled falls back to torch with one warning."""
    cpu_threads: int = 1
    """torch intra-op threads when the model runs on the CPU (0 = torch's default). Around the
    compiled kernels torch works on many mid-sized tensors, where extra threads mostly spin: one
    thread was 4x faster than two on a loaded 2-core machine."""
    compiled_threads: int = 0
    """Threads of the compiled CPU kernels, parallel over image tiles (0 = every core)."""
    contrastive_threads: int = 0
    """torch intra-op threads of the contrastive loss on the CPU, whatever ``cpu_threads`` says: its
    [M, M] products are few and large, where threads pay (6.4 ms forward and backward at 1280
    samples on one thread, 4 ms on two, the rest of the step idle meanwhile). 0: as many as the
    compiled kernels use (every core unless ``compiled_threads`` or NUMBA_NUM_THREADS say fewer);
    with the torch backend, ``cpu_threads``."""
    cpu_keep_freed_memory: bool = True
    """On the CPU, let the process keep freed memory (up to 1 GiB of it) for the next step's arrays
    instead of handing it to the OS and faulting fresh pages in again (glibc only; see
    ``trace3d_ns.device.keep_freed_host_memory``): about 10% of a compiled training step."""


class Trace3DModel(SplatfactoModel):
    """Splatfacto, device-agnostic. Later stages (instance tracing, features) build on it."""

    config: Trace3DModelConfig

    def __init__(self, *args, **kwargs) -> None:
        device = require_device(kwargs.get("device", "cpu"))
        if device.type == "cuda":
            require_gsplat_cuda()  # a clear message now, not an AttributeError at the first render
        super().__init__(*args, **kwargs)
        self._contrastive_batch: Optional[Dict[str, Tensor]] = None  # planned by the pipeline for the next render
        self._contrastive_sample: Optional[Tuple[Tensor, Tensor, Optional[Tensor]]] = None  # (picked, labels, alike) of that render
        self.masks_span_patches = True
        """Whether a mask of some training view covers most of two of its patches (the pipeline sets
        it from the served alike matrices). False when the masks partition every view (the ``levels``
        source): nothing then tells an object's parts from two objects, and the raw patches' share
        of the loss (``contrastive_raw_weight``) would push the parts apart, so it is not applied."""
        if device.type == "cpu" and self.config.cpu_threads > 0:
            torch.set_num_threads(self.config.cpu_threads)
        if device.type == "cpu" and self.config.cpu_keep_freed_memory:
            keep_freed_host_memory()
        from trace3d_ns.rendering import resolve_backend

        self.backend = resolve_backend(self.config.rasterizer, device)  # warns once if it falls back
        if self.backend == "compiled":
            from trace3d_ns.cuda.compiled import set_threads
            from trace3d_ns.cuda.ssim import SSIM

            set_threads(self.config.compiled_threads)
            # the loss's SSIM in compiled kernels too (pytorch_msssim's convolutions were ~5% of a CPU step)
            self.ssim = SSIM(data_range=1.0, channel=3)

    # ---- set-up -------------------------------------------------------------------------------
    def populate_modules(self) -> None:
        self.gauss_params = torch.nn.ParameterDict(self._initial_gaussians())
        self.camera_optimizer = self.config.camera_optimizer.setup(num_cameras=self.num_train_data, device="cpu")

        from pytorch_msssim import SSIM
        from torchmetrics.image import PeakSignalNoiseRatio

        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = SSIM(data_range=1.0, size_average=True, channel=3)
        self.lpips = offline_lpips()
        self.step = 0
        self.crop_box = None
        if self.config.background_color == "random":
            self.background_color = torch.tensor([0.1490, 0.1647, 0.2157])  # viser's background
        else:
            self.background_color = get_color(self.config.background_color)
        if self.config.use_bilateral_grid:
            from nerfstudio.model_components.lib_bilagrid import BilateralGrid

            self.bil_grids = BilateralGrid(
                num=self.num_train_data,
                grid_X=self.config.grid_shape[0],
                grid_Y=self.config.grid_shape[1],
                grid_W=self.config.grid_shape[2],
            )
        self.strategy = self._make_strategy()
        self.strategy_state = self.strategy.initialize_state(scene_scale=1.0)
        self.feature_pca = FeaturePCA()
        self.register_buffer("instance_labels", torch.zeros(0, dtype=torch.long), persistent=True)
        self.register_buffer("instance_confidence", torch.zeros(0), persistent=True)
        # [N] bool: children of the last GIT density control split, checked (pruned if still
        # ambiguous) by the next cycle; in the checkpoint so a resumed run checks them too
        self.register_buffer("density_children", torch.zeros(0, dtype=torch.bool), persistent=True)
        self.instance_traces = None  # the latest InstanceTraces (not checkpointed), for density control
        self.selection_cameras = None  # training cameras (set by the pipeline) for selection features
        self._selection_features = None  # (key, [N, D]) cache of selection_features()
        from trace3d_ns.viewer_controls import InstanceViewerControls

        self.viewer_controls = InstanceViewerControls(self)  # click selection, PCA, export (no state)

    def _initial_gaussians(self) -> Dict[str, Parameter]:
        """Gaussians at the seed points (coloured) or uniformly random in a cube, on the CPU."""
        cfg = self.config
        has_seed = self.seed_points is not None and not cfg.random_init
        if has_seed:
            means = self.seed_points[0].float()  # [N, 3]
        else:
            means = (torch.rand(cfg.num_random, 3) - 0.5) * cfg.random_scale
        distances, _ = self.k_nearest_sklearn(means, 3)
        avg_dist = torch.from_numpy(distances).float().mean(dim=-1, keepdim=True)  # [N, 1]
        n = means.shape[0]
        dim_sh = num_sh_bases(cfg.sh_degree)
        features_rest = torch.zeros(n, dim_sh - 1, 3)
        if has_seed and self.seed_points[1].shape[0] > 0:
            rgb = self.seed_points[1].float() / 255.0  # [N, 3]
            features_dc = RGB2SH(rgb) if cfg.sh_degree > 0 else torch.logit(rgb, eps=1e-10)
        else:
            features_dc = torch.rand(n, 3)
        params = {
            "means": Parameter(means),
            "scales": Parameter(torch.log(avg_dist.clamp(min=1e-7).repeat(1, 3))),
            "quats": Parameter(random_quat_tensor(n)),
            "features_dc": Parameter(features_dc),
            "features_rest": Parameter(features_rest),
            "opacities": Parameter(torch.logit(0.1 * torch.ones(n, 1))),
        }
        if cfg.feature_dim > 0:
            params["features"] = Parameter(0.1 * torch.randn(n, cfg.feature_dim))
        return params

    def _make_strategy(self) -> DefaultStrategy:
        cfg = self.config
        return DefaultStrategy(
            prune_opa=cfg.cull_alpha_thresh,
            grow_grad2d=cfg.densify_grad_thresh,
            grow_scale3d=cfg.densify_size_thresh,
            grow_scale2d=cfg.split_screen_size,
            prune_scale3d=cfg.cull_scale_thresh,
            prune_scale2d=cfg.cull_screen_size,
            refine_scale2d_stop_iter=cfg.stop_screen_size_at,
            refine_start_iter=cfg.warmup_length,
            refine_stop_iter=cfg.stop_split_at,
            reset_every=cfg.reset_alpha_every * cfg.refine_every,
            refine_every=cfg.refine_every,
            pause_refine_after_reset=self.num_train_data + cfg.refine_every,
            absgrad=cfg.use_absgrad,
            revised_opacity=False,
            verbose=False,
        )

    def get_gaussian_param_groups(self) -> Dict[str, List[Parameter]]:
        return {name: [param] for name, param in self.gauss_params.items()}

    @property
    def has_features(self) -> bool:
        return "features" in self.gauss_params

    @torch.no_grad()
    def selection_features(self) -> Tensor:
        """Per-Gaussian features that feature selection compares: the rendered features traced back
        over the training views (cached, see ``selection_cache_key``); the raw features when the
        model has no training cameras. [N, D]"""
        features = self.gauss_params["features"]
        if self.selection_cameras is None:
            return features.detach()
        key = self.selection_cache_key()
        if self._selection_features is None or self._selection_features[0] != key:
            from trace3d_ns.features.backprojection import backproject_features

            cameras = self.selection_cameras.to(self.device)
            self._selection_features = (key, backproject_features(self, cameras, self.config.selection_views))
        return self._selection_features[1]

    def selection_cache_key(self) -> tuple:
        """What the selection features depend on: the cameras, the number of views and Gaussians, and
        the Gaussians' parameters. While training (an optimizer is attached by ``step_cb``) every step
        changes the parameters, so they stand in as the step, in blocks of ``selection_refresh_steps``;
        otherwise as each parameter tensor's identity and in-place version."""
        key = (id(self.selection_cameras), self.config.selection_views, self.num_points)
        if getattr(self, "optimizers", None) is not None:
            return key + ("step", self.step // max(self.config.selection_refresh_steps, 1))
        names = ("features", "means", "quats", "scales", "opacities")
        return key + tuple((id(self.gauss_params[n]), self.gauss_params[n]._version) for n in names)

    PER_GAUSSIAN_BUFFERS = ("instance_labels", "instance_confidence", "density_children")
    """Buffers with one row per Gaussian (or empty): resized on load, carried through densification."""

    def load_state_dict(self, state_dict, **kwargs):  # type: ignore[override]
        # splatfacto resizes gauss_params (features included) to the checkpoint; per-Gaussian buffers
        # too (a checkpoint from before a buffer existed loads it empty)
        state_dict = dict(state_dict)
        for name in self.PER_GAUSSIAN_BUFFERS:
            like = getattr(self, name)
            saved = state_dict.setdefault(name, torch.zeros(0, dtype=like.dtype))
            setattr(self, name, torch.zeros(saved.shape, dtype=like.dtype, device=self.device))
        return super().load_state_dict(state_dict, **kwargs)

    # ---- instances ----------------------------------------------------------------------------
    def set_instances(self, labels: Tensor, confidence: Tensor, traces=None) -> None:
        """Per-Gaussian instance labels [N] (0 = none) and confidences [N] from Gaussian Instance Tracing."""
        if labels.shape != (self.num_points,) or confidence.shape != (self.num_points,):
            raise ValueError(f"expected [{self.num_points}] labels and confidences, got {tuple(labels.shape)}")
        self.instance_labels = labels.to(self.device, torch.long)
        self.instance_confidence = confidence.to(self.device, torch.float32)
        self.instance_traces = traces

    def step_post_backward(self, step: int) -> None:
        # gsplat's strategy ops carry every [N, ...] tensor of the strategy state through
        # duplicate / split / prune: let the per-Gaussian instance buffers ride along.
        carried = [n for n in self.PER_GAUSSIAN_BUFFERS if getattr(self, n).shape[:1] == (self.num_points,)]
        for name in carried:
            self.strategy_state[name] = getattr(self, name)
        super().step_post_backward(step)
        for name in carried:
            setattr(self, name, self.strategy_state.pop(name))
        if carried and self.instance_traces is not None and self.instance_traces.num_gaussians != self.num_points:
            self.instance_traces = None  # stale: density control re-traces

    # ---- rendering ----------------------------------------------------------------------------
    def activated_gaussians(self, mask: Optional[Tensor] = None, sh_degree: Optional[int] = None) -> Dict[str, Tensor]:
        """Rasterizer-ready tensors (scales exp'd, opacities sigmoid'd), optionally a subset; with
        `sh_degree`, "sh" holds only the coefficients up to that degree (the rest would be read by no
        one: while training ramps the degree up, copying them costs a few % of a CPU step)."""

        def pick(t: Tensor) -> Tensor:
            return t if mask is None else t[mask]

        rest = pick(self.features_rest)
        if sh_degree is not None:
            rest = rest[:, : (sh_degree + 1) ** 2 - 1]
        return {
            "means": pick(self.means),
            "quats": pick(self.quats),
            "scales": torch.exp(pick(self.scales)),
            "opacities": torch.sigmoid(pick(self.opacities)).squeeze(-1),
            "sh": torch.cat([pick(self.features_dc)[:, None, :], rest], dim=1),
            **({"features": pick(self.gauss_params["features"])} if self.has_features else {}),
        }

    def camera_matrices(
        self, camera: Cameras, as_given: bool = False, full_resolution: bool = False
    ) -> tuple[Tensor, Tensor, int, int]:
        """(viewmat [1, 4, 4], K [1, 3, 3], W, H) at the current training resolution, with the camera
        optimizer's correction while training; `as_given`: the camera's own pose and full resolution;
        `full_resolution`: the training pose at the camera's full resolution."""
        camera = camera.to(self.device)
        refine = self.training and not as_given
        c2w = self.camera_optimizer.apply_to_camera(camera) if refine else camera.camera_to_worlds
        scale = self._get_downscale_factor() if refine and not full_resolution else 1
        camera.rescale_output_resolution(1 / scale)
        K = camera.get_intrinsics_matrices().reshape(-1, 3, 3)
        W, H = int(camera.width.item()), int(camera.height.item())
        camera.rescale_output_resolution(scale)
        return get_viewmat(c2w), K, W, H

    def get_outputs(self, camera: Cameras) -> Dict[str, Union[Tensor, List]]:
        if not isinstance(camera, Cameras):
            return {}
        if self.training and camera.shape[0] != 1:
            raise ValueError("Trace3DModel trains on one camera at a time")
        mask = None
        if self.crop_box is not None and not self.training:
            mask = self.crop_box.within(self.means).squeeze()
            if mask.sum() == 0:
                return self.get_empty_outputs(int(camera.width.item()), int(camera.height.item()), self.background_color)
        viewmat, K, W, H = self.camera_matrices(camera)
        self.last_size = (H, W)
        active = min(self.step // self.config.sh_degree_interval, self.config.sh_degree)
        g = self.activated_gaussians(mask, sh_degree=active if self.config.sh_degree > 0 else None)

        if self.config.sh_degree > 0:
            colors, sh_degree = g["sh"], active
        else:
            colors, sh_degree = torch.sigmoid(g["sh"]).squeeze(1), None  # [N, 3]
        render_mode = "RGB+ED" if self.config.output_depth_during_training or not self.training else "RGB"
        if self.config.rasterize_mode not in ("antialiased", "classic"):
            raise ValueError(f"Unknown rasterize_mode: {self.config.rasterize_mode}")

        args = (g["means"], g["quats"], g["scales"], g["opacities"], colors, viewmat, K, W, H)
        kwargs = dict(
            packed=False, near_plane=0.01, far_plane=1e10, render_mode=render_mode, sh_degree=sh_degree,
            sparse_grad=False, absgrad=self.strategy.absgrad, rasterize_mode=self.config.rasterize_mode,
            backend=self.config.rasterizer,
        )
        features = None
        if self.has_features and (not self.training or self.step >= self.config.feature_start_step):
            render, alpha, self.info, features = rasterize_with_extra(
                *args, extra_colors=g["features"], extra_grad_to_geometry=self.config.feature_grad_to_geometry,
                extra_pixels=self._sample_contrastive_pixels(H, W), **kwargs
            )
        else:
            render, alpha, self.info = rasterize(*args, **kwargs)
        if self.training:
            self.strategy.step_pre_backward(self.gauss_params, self.optimizers, self.strategy_state, self.step, self.info)

        background = self._get_background_color().to(self.device)
        rgb = torch.clamp(render[..., :3] + (1 - alpha) * background, 0.0, 1.0)  # [1, H, W, 3]
        if self.config.use_bilateral_grid and self.training and camera.metadata and "cam_idx" in camera.metadata:
            rgb = self._apply_bilateral_grid(rgb, camera.metadata["cam_idx"], H, W)
        depth = None
        if render_mode == "RGB+ED":
            depth = torch.where(alpha > 0, render[..., 3:4], render[..., 3:4].detach().max()).squeeze(0)
        if background.shape[0] == 3 and not self.training:
            background = background.expand(H, W, 3)
        outputs: Dict[str, Union[Tensor, List]] = dict(
            rgb=rgb.squeeze(0), depth=depth, accumulation=alpha.squeeze(0), background=background
        )
        if features is not None:
            outputs["feature"] = features[0]  # [H, W, D]
        return outputs

    # ---- losses -------------------------------------------------------------------------------
    def training_labels(self, batch: Dict[str, Tensor], size: Optional[Tuple[int, int]] = None) -> Optional[Tensor]:
        """The instance labels to lift: consistent maps once GIT made them, else the raw patches,
        at `size` (H, W; default the last render's)."""
        labels = batch.get("instances", batch.get("patches"))
        if labels is None:
            return None
        return downscale_patches(labels, size or self.last_size).to(self.device)  # [H, W] at the render size

    def plan_contrastive_samples(self, batch: Dict[str, Tensor]) -> None:
        """Hands the model this training step's batch before its render (``Trace3DPipeline`` does),
        so that the render picks the contrastive loss's pixels and composites the feature channels
        only there: the loss reads about 1k of the image's pixels. Without a plan the features are
        rendered everywhere and the loss samples afterwards, with the same result."""
        self._contrastive_batch = batch if self.training else None

    def _sample_contrastive_pixels(self, height: int, width: int) -> Optional[Tensor]:
        """[1, H, W] bool: the planned step's contrastive pixels (kept for ``get_loss_dict``), or None
        (features everywhere) outside a planned training step."""
        batch, self._contrastive_batch, self._contrastive_sample = self._contrastive_batch, None, None
        labels = None if batch is None or not self.training else self.training_labels(batch, (height, width))
        if labels is None:
            return None
        picked = self._pick_contrastive_pixels(labels)  # [M]
        self._contrastive_sample = (picked, labels.reshape(-1)[picked], self._contrastive_alike(batch))
        wanted = torch.zeros(height * width, dtype=torch.bool, device=labels.device)
        wanted[picked] = True
        return wanted.reshape(1, height, width)

    def _patch_alike(self, batch: Dict[str, Tensor]) -> Optional[Tensor]:
        """[T + 1, T + 1] bool: the batch's patches that one mask covers together, when
        ``contrastive_alike_by_masks`` is on and the batch has them; else None."""
        alike = batch.get("patch_alike") if self.config.contrastive_alike_by_masks else None
        return None if alike is None else alike.to(self.device)

    def _contrastive_alike(self, batch: Dict[str, Tensor]) -> Optional[Tensor]:
        """``_patch_alike`` when the loss's labels are the raw patches (no consistent maps yet)."""
        return None if "instances" in batch else self._patch_alike(batch)

    def _raw_patch_labels(self, batch: Dict[str, Tensor], picked: Tensor) -> Optional[Tensor]:
        """[M] raw patch ids at the sampled pixels, when the labels are consistent maps,
        ``contrastive_raw_weight`` > 0 and the masks span patches; else None."""
        if self.config.contrastive_raw_weight <= 0.0 or not self.masks_span_patches:
            return None
        if "instances" not in batch or "patches" not in batch:
            return None
        return downscale_patches(batch["patches"], self.last_size).to(self.device).reshape(-1)[picked]

    def _pick_contrastive_pixels(self, labels: Tensor) -> Tensor:
        return sample_labelled_pixels(
            labels, self.config.contrastive_samples, num_unlabelled=self.config.contrastive_unlabelled_samples,
            balanced=self.config.contrastive_balanced, min_per_label=self.config.contrastive_min_per_instance,
        )

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, Tensor]:
        loss_dict = super().get_loss_dict(outputs, batch, metrics_dict)
        sample, self._contrastive_sample = self._contrastive_sample, None  # planned (picked, labels, alike)
        if "feature" not in outputs or not self.training:
            return loss_dict
        if sample is None:
            labels = self.training_labels(batch)
            if labels is not None:
                picked = self._pick_contrastive_pixels(labels)
                sample = (picked, labels.reshape(-1)[picked], self._contrastive_alike(batch))
        if sample is not None:
            picked, labels, alike = sample
            features = outputs["feature"].reshape(-1, outputs["feature"].shape[-1])[picked]
            threads = self._contrastive_threads()
            loss = contrastive_loss(features, labels, self.config.contrastive_temperature, alike, threads)
            raw = self._raw_patch_labels(batch, picked)
            if raw is not None:
                w = self.config.contrastive_raw_weight
                raw_loss = contrastive_loss(
                    features, raw, self.config.contrastive_temperature, self._patch_alike(batch), threads
                )
                loss = (1.0 - w) * loss + w * raw_loss
            loss_dict["contrastive_loss"] = self.config.contrastive_weight * loss
        return loss_dict

    def _contrastive_threads(self) -> Optional[int]:
        """Threads for the contrastive loss (``contrastive_threads``; None off the CPU: as set)."""
        if self.device.type != "cpu":
            return None
        if self.config.contrastive_threads > 0:
            return self.config.contrastive_threads
        if self.backend == "compiled":
            from trace3d_ns.cuda.compiled import kernel_threads

            return kernel_threads()
        return None

    VIEWER_FIRST = ("rgb", "feature_pca", "instance", "selection")
    """Leading outputs of ``get_outputs_for_camera``. The viewer's output dropdown lists the keys in
    order, opens on the first and falls back to it when the shown output disappears (e.g. `selection`
    after "Clear selection"); the raw 16-D `feature` (a per-frame PCA in the viewer) comes last."""

    @torch.no_grad()
    def get_outputs_for_camera(self, camera: Cameras, obb_box=None) -> Dict[str, Tensor]:
        """Splatfacto's outputs plus the viewer's `feature_pca`, `instance` and `selection` renders,
        ordered as ``VIEWER_FIRST``, then the rest (depth, accumulation, background, feature)."""
        outputs = super().get_outputs_for_camera(camera, obb_box)
        outputs.update(self.viewer_controls.extra_outputs(camera.to(self.device), outputs))
        ordered = {k: outputs[k] for k in self.VIEWER_FIRST if k in outputs}
        ordered.update((k, v) for k, v in outputs.items() if k not in ordered)
        return ordered

    # ---- evaluation ---------------------------------------------------------------------------
    def get_image_metrics_and_images(self, outputs, batch):
        if self.lpips is not None:
            return super().get_image_metrics_and_images(outputs, batch)
        self.lpips = _NaNMetric()  # reuse splatfacto's metric code, then drop the placeholder values
        try:
            metrics, images = super().get_image_metrics_and_images(outputs, batch)
        finally:
            self.lpips = None
        return {k: v for k, v in metrics.items() if not k.endswith("lpips")}, images


class _NaNMetric:
    def __call__(self, *args, **kwargs) -> Tensor:
        return torch.tensor(float("nan"))
