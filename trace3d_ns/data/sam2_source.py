"""The ``sam2`` mask source: SAM 2.1's ``SAM2AutomaticMaskGenerator`` on each training image.

Meta's ``sam2`` package is an optional extra (``pip install -e .[sam2]``); neither the base install
nor the ``sam`` source needs it, and nothing here imports it before masks are actually computed.
The model is built from a local checkpoint and its hydra model config (the package's
``configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml`` by default, or any yaml given), exactly as
``sam2.build_sam.build_sam2(..., apply_postprocessing=False)`` builds it for automatic mask
generation, but without hydra's config search path so that a config file anywhere works. Nothing
is ever downloaded.

Two departures from the package's generator, both so that the masks depend only on the settings:

- ``min_mask_region_area`` is applied to the full-resolution masks with the package's own
  ``postprocess_small_regions`` (holes and islands removed, duplicates suppressed again), as SAM 1's
  generator does. sam2 1.1.0 routes this setting only to a CUDA extension that most installs lack
  (it then warns and skips it), so the same setting would give different masks on different builds.
- The image predictor's feature-map sizes are derived from the model's ``image_size`` (the package
  hard-codes those of 1024 px, the size of every released config); this lets the tests run a tiny
  128 px model on the CPU.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Tuple, Type, Union

import numpy as np
import torch

from trace3d_ns.data.mask_sources import (
    WEIGHTS_FREE_SOURCES,
    MaskSourceError,
    MissingModelFileError,
    MissingPackageError,
    PromptGridMaskSource,
    PromptGridMaskSourceConfig,
    model_file_stamp,
)

Sam2ModelName = Literal["tiny", "small", "base-plus", "large"]

SAM2_MODELS: Dict[str, Tuple[str, str]] = {
    "tiny": ("configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt"),
    "small": ("configs/sam2.1/sam2.1_hiera_s.yaml", "sam2.1_hiera_small.pt"),
    "base-plus": ("configs/sam2.1/sam2.1_hiera_b+.yaml", "sam2.1_hiera_base_plus.pt"),
    "large": ("configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_large.pt"),
}
"""Per SAM 2.1 model: its config inside the sam2 package and the official checkpoint file name."""

SAM2_CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
"""Where Meta's SAM 2.1 release serves the checkpoints (github.com/facebookresearch/sam2)."""

SAM2_INSTALL = "pip install -e .[sam2]"
"""The command that installs the optional extra (from a trace3d-ns checkout; it pins sam2==1.1.0)."""


@dataclass
class Sam2MaskSourceConfig(PromptGridMaskSourceConfig):
    """SAM 2.1 automatic mask generation (Meta's ``sam2`` package, an optional extra)."""

    _target: Type = field(default_factory=lambda: Sam2MaskSource)
    model: Sam2ModelName = "large"
    """SAM 2.1 model size; must match the checkpoint. Selects the package's model config unless
    model_config is given."""
    checkpoint: Optional[Path] = None
    """Local SAM 2.1 checkpoint, e.g. sam2.1_hiera_large.pt from Meta's SAM 2 release."""
    model_config: Optional[Path] = None
    """SAM 2 model config (hydra yaml) matching the checkpoint; None uses the sam2 package's
    configs/sam2.1/sam2.1_hiera_<t|s|b+|l>.yaml for model. A relative path that is not a file is
    looked up inside the sam2 package, e.g. configs/sam2/sam2_hiera_l.yaml for a SAM 2.0 checkpoint."""
    pred_iou_thresh: float = 0.8
    """Drop masks whose predicted IoU is below this (the package's default)."""
    stability_score_thresh: float = 0.95
    """Drop masks whose stability score is below this (the package's default)."""
    multimask_output: bool = True
    """Predict three masks (whole, part, subpart) per point prompt instead of one."""


def sam2_package_dir() -> Optional[Path]:
    """The installed sam2 package's folder, found without importing it (None if not installed)."""
    try:
        spec = importlib.util.find_spec("sam2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model_config(config: Sam2MaskSourceConfig) -> Optional[Path]:
    """The model config file ``config`` asks for, or None if it cannot be found (see
    :attr:`Sam2MaskSourceConfig.model_config` for the lookup)."""
    package = sam2_package_dir()
    if config.model_config is None:
        if package is None:
            return None
        path = package / SAM2_MODELS[config.model][0]
        return path if path.is_file() else None
    path = Path(config.model_config).expanduser()
    if path.is_file():
        return path
    if not path.is_absolute() and package is not None and (package / path).is_file():
        return package / path
    return None


def _missing_package_message() -> str:
    return (
        "The 'sam2' mask source needs Meta's sam2 package (SAM 2.1), which is not installed in this "
        f"environment. Install the optional extra from the trace3d-ns checkout with `{SAM2_INSTALL}` "
        "(it pins sam2==1.1.0; the base install and the 'sam' source do not need it). " + WEIGHTS_FREE_SOURCES
    )


def _missing_config_message(config: Sam2MaskSourceConfig) -> str:
    if config.model_config is None:
        name = SAM2_MODELS[config.model][0]
        return (
            f"The 'sam2' mask source needs the SAM 2.1 {config.model} model config {name}, which should "
            f"ship with the sam2 package but is not in {sam2_package_dir()}. Reinstall the extra with "
            f"`{SAM2_INSTALL}` (sam2 1.1.0 has configs/sam2.1/sam2.1_hiera_{{t,s,b+,l}}.yaml), or pass a "
            f"config file with `--pipeline.datamanager.sam2.model-config FILE`. " + WEIGHTS_FREE_SOURCES
        )
    return (
        f"The 'sam2' mask source needs the SAM 2 model config '{config.model_config}', but it is neither a "
        f"file nor a config inside the sam2 package. Pass the yaml that matches the checkpoint with "
        f"`--pipeline.datamanager.sam2.model-config FILE` (a path, or a name inside the package such as "
        f"{SAM2_MODELS['large'][0]}), or leave it unset to use the package's config for "
        f"`--pipeline.datamanager.sam2.model {config.model}`. " + WEIGHTS_FREE_SOURCES
    )


def _missing_checkpoint_message(config: Sam2MaskSourceConfig) -> str:
    name = SAM2_MODELS[config.model][1]
    where = "no checkpoint was given" if config.checkpoint is None else f"'{config.checkpoint}' does not exist"
    return (
        f"The 'sam2' mask source needs the SAM 2.1 {config.model} checkpoint, but {where}. Download {name} "
        f"from Meta's SAM 2 release ({SAM2_CHECKPOINT_URL}{name}, listed under 'Download Checkpoints' in "
        f"github.com/facebookresearch/sam2; also on the Hugging Face hub as "
        f"facebook/sam2.1-hiera-{config.model}) and pass it with "
        f"`--pipeline.datamanager.sam2.checkpoint /path/to/{name}` (and "
        f"`--pipeline.datamanager.sam2.model {config.model}` to match the file). Nothing is downloaded "
        f"automatically. " + WEIGHTS_FREE_SOURCES
    )


def check_sam2_files(config: Sam2MaskSourceConfig) -> Tuple[Path, Path]:
    """The (model config, checkpoint) files of ``config``, checked without importing sam2.

    Raises:
        MissingPackageError: the sam2 package is not installed.
        MissingModelFileError: the model config or the checkpoint is missing.
    """
    if sam2_package_dir() is None:
        raise MissingPackageError(_missing_package_message())
    model_config = resolve_model_config(config)
    if model_config is None:
        raise MissingModelFileError(_missing_config_message(config))
    if config.checkpoint is None or not Path(config.checkpoint).expanduser().is_file():
        raise MissingModelFileError(_missing_checkpoint_message(config))
    return model_config, Path(config.checkpoint).expanduser()


def instantiate_sam2(model_config: Union[Path, Any]) -> torch.nn.Module:
    """A SAM 2 model with freshly initialised weights from a model config (a yaml file or an
    OmegaConf config with a ``model`` section), in eval mode on the CPU."""
    from hydra.utils import instantiate  # heavy, lazy (comes with sam2)
    from omegaconf import DictConfig, OmegaConf

    cfg = model_config if isinstance(model_config, DictConfig) else OmegaConf.load(Path(model_config))
    if "model" not in cfg:
        raise MaskSourceError(f"{model_config} is not a SAM 2 model config: it has no 'model' section")
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # a resolved copy
    try:
        model = instantiate(cfg.model, _recursive_=True)
    except Exception as err:  # hydra wraps every construction error in its own types
        raise MaskSourceError(f"Could not build a SAM 2 model from {model_config}: {err}") from err
    return model.eval()


def state_dict_mismatch(expected: Dict[str, torch.Tensor], given: Dict[str, Any]) -> str:
    """A one-line summary of how ``given`` fails to fit a model with state dict ``expected`` ("" if it fits)."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    reshaped = [
        k for k in expected
        if k in given and isinstance(given[k], torch.Tensor) and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or reshaped):
        return ""
    examples = [f"{k} has shape {tuple(given[k].shape)}, the model {tuple(expected[k].shape)}" for k in reshaped[:1]]
    examples += [f"{k} is missing" for k in missing[:1]] + [f"{k} is unexpected" for k in unexpected[:1]]
    return (
        f"{len(missing)} weights missing, {len(unexpected)} unexpected, {len(reshaped)} of another shape "
        f"(e.g. {'; '.join(examples)})"
    )


def build_sam2_from_checkpoint(config: Sam2MaskSourceConfig) -> torch.nn.Module:
    """The SAM 2 model of ``config``'s model config with the weights of ``config.checkpoint``.

    The checkpoint is read as Meta's release stores it (``{"model": state_dict}``; a bare state
    dict is accepted too), on the CPU and with ``weights_only``.

    Raises:
        MissingPackageError, MissingModelFileError: see :func:`check_sam2_files`.
        MaskSourceError: the checkpoint is unreadable or does not fit the model config.
    """
    model_config, checkpoint = check_sam2_files(config)
    model = instantiate_sam2(model_config)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged or foreign file
        raise MaskSourceError(f"Could not read SAM 2 checkpoint '{checkpoint}': {err}") from err
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise MaskSourceError(f"SAM 2 checkpoint '{checkpoint}' holds no state dict (a {type(state).__name__})")
    problem = state_dict_mismatch(model.state_dict(), state)
    if problem:  # usually a checkpoint of another model size
        sizes = ", ".join(f"{k}: {v[1]}" for k, v in SAM2_MODELS.items())
        raise MaskSourceError(
            f"SAM 2 checkpoint '{checkpoint}' does not fit the model config {model_config}: {problem}. Check that "
            f"--pipeline.datamanager.sam2.model (or --pipeline.datamanager.sam2.model-config) matches the checkpoint ({sizes})."
        )
    model.load_state_dict(state)
    return model


def remove_small_regions(masks: np.ndarray, min_area: int, nms_thresh: float) -> np.ndarray:
    """SAM's post-processing of automatic masks, with the sam2 package's own implementation: in
    every mask, fill holes and drop islands smaller than ``min_area`` pixels; then suppress masks
    whose boxes overlap a kept one by IoU > ``nms_thresh``, preferring masks that needed no change.

    Args:
        masks: [K, H, W] bool.

    Returns:
        [K', H, W] bool, K' <= K.
    """
    if masks.shape[0] == 0 or min_area <= 0:
        return masks
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator  # heavy, lazy
    from sam2.utils.amg import MaskData, batched_mask_to_box, mask_to_rle_pytorch, rle_to_mask

    stack = torch.from_numpy(np.ascontiguousarray(masks, dtype=bool))  # [K, H, W]
    data = MaskData(rles=mask_to_rle_pytorch(stack), boxes=batched_mask_to_box(stack))
    data = SAM2AutomaticMaskGenerator.postprocess_small_regions(data, int(min_area), float(nms_thresh))
    if not data["rles"]:
        return np.zeros((0, *masks.shape[1:]), dtype=bool)
    return np.stack([np.asarray(rle_to_mask(rle), dtype=bool) for rle in data["rles"]])  # [K', H, W]


def tiny_sam2_model_config(image_size: int = 128, dim: int = 32, memory_dim: int = 16) -> Any:
    """The sam2 package's SAM 2.1 tiny config, shrunk to a ~0.8 M-parameter model: ``image_size``
    px input (a multiple of 32), one Hiera block per stage at 8 channels, ``dim``-d neck and heads.

    With random weights its masks are meaningless; it exists so that the ``sam2`` code path (model
    config, checkpoint, generator) runs end to end on a CPU without downloading weights.
    """
    from omegaconf import OmegaConf

    package = sam2_package_dir()
    if package is None:
        raise MissingPackageError(_missing_package_message())
    if image_size % 32:
        raise ValueError(f"image_size must be a multiple of 32 (the Hiera trunk's stride), got {image_size}")
    cfg = OmegaConf.load(package / SAM2_MODELS["tiny"][0])
    trunk = 8
    overrides = {
        "model.image_size": image_size,
        "model.image_encoder.trunk.embed_dim": trunk,
        "model.image_encoder.trunk.num_heads": 1,
        "model.image_encoder.trunk.stages": [1, 1, 1, 1],
        # Global attention in a stage's first (pooling) block is unsupported by Hiera; stay windowed.
        "model.image_encoder.trunk.global_att_blocks": [],
        "model.image_encoder.neck.d_model": dim,
        "model.image_encoder.neck.backbone_channel_list": [8 * trunk, 4 * trunk, 2 * trunk, trunk],
        "model.image_encoder.neck.position_encoding.num_pos_feats": dim,
        "model.memory_attention.d_model": dim,
        "model.memory_attention.num_layers": 1,
        "model.memory_attention.layer.d_model": dim,
        "model.memory_attention.layer.dim_feedforward": dim,
        "model.memory_attention.layer.self_attention.embedding_dim": dim,
        "model.memory_attention.layer.cross_attention.embedding_dim": dim,
        "model.memory_attention.layer.cross_attention.kv_in_dim": memory_dim,
        "model.memory_encoder.out_dim": memory_dim,
        "model.memory_encoder.position_encoding.num_pos_feats": memory_dim,
        "model.memory_encoder.fuser.layer.dim": dim,
        "model.memory_encoder.fuser.num_layers": 1,
    }
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def write_tiny_random_sam2(directory: Path, image_size: int = 128, seed: int = 0) -> Tuple[Path, Path]:
    """Write a random-weight tiny SAM 2 (:func:`tiny_sam2_model_config`) as a model config yaml and a
    checkpoint in Meta's layout (``{"model": state_dict}``), for ``model_config`` / ``checkpoint``.

    Returns:
        (model config path, checkpoint path); the checkpoint depends only on ``seed`` and the size.
    """
    from omegaconf import OmegaConf

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = tiny_sam2_model_config(image_size=image_size)
    config_path = directory / f"sam2_tiny_random_{image_size}.yaml"
    OmegaConf.save(cfg, config_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = instantiate_sam2(cfg)
    checkpoint_path = directory / f"sam2_tiny_random_{image_size}_seed{seed}.pt"
    torch.save({"model": model.state_dict()}, checkpoint_path)
    return config_path, checkpoint_path


class Sam2MaskSource(PromptGridMaskSource):
    """Runs ``SAM2AutomaticMaskGenerator`` on the RGB image.

    Args:
        config: the settings.
        device: device used when ``config.device`` is None.
        build_model: factory ``config -> SAM2Base`` used instead of the files (tests, scripts).
    """

    config: Sam2MaskSourceConfig

    def check_model_files(self) -> None:
        check_sam2_files(self.config)

    def model_file_stamps(self) -> Dict[str, Any]:
        return {
            "checkpoint": model_file_stamp(self.config.checkpoint),
            "model_config": model_file_stamp(resolve_model_config(self.config)),
        }

    def build_model(self) -> torch.nn.Module:
        return build_sam2_from_checkpoint(self.config)

    def make_generator(self, model: torch.nn.Module) -> Any:
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator  # heavy, lazy

        c = self.config
        with warnings.catch_warnings():
            # sam2 1.1.0 scripts its image transforms with torch.jit, which this torch deprecates.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
            generator = SAM2AutomaticMaskGenerator(
                model,
                points_per_side=c.points_per_side,
                points_per_batch=c.points_per_batch,
                pred_iou_thresh=c.pred_iou_thresh,
                stability_score_thresh=c.stability_score_thresh,
                min_mask_region_area=0,  # applied in generate(), on every device and build alike
                multimask_output=c.multimask_output,
                output_mode="binary_mask",
            )
        size = int(model.image_size)  # backbone levels at strides 4, 8, 16 (the package assumes 1024 px)
        generator.predictor._bb_feat_sizes = [(size // s, size // s) for s in (4, 8, 16)]
        return generator

    def generate(self, generator: Any, rgb: np.ndarray) -> np.ndarray:
        masks = super().generate(generator, rgb)  # [K, H, W]
        nms = max(generator.box_nms_thresh, generator.crop_nms_thresh)
        return remove_small_regions(masks, self.config.min_mask_region_area, nms)
