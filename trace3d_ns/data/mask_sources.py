"""Where the per-image 2D instance masks come from.

Each source turns an RGB uint8 image ``[H, W, 3]`` into ``[K, H, W]`` bool masks that may overlap
(:mod:`trace3d_ns.data.patches` turns them into disjoint patches). The sources:

- ``sam``: segment-anything's ``SamAutomaticMaskGenerator`` (needs a local checkpoint).
- ``sam2``: SAM 2.1's ``SAM2AutomaticMaskGenerator`` (optional ``sam2`` package, local checkpoint);
  it lives in :mod:`trace3d_ns.data.sam2_source` and shares :class:`PromptGridMaskSource` with ``sam``.
- ``folder``: precomputed masks, one file per image (``.npy`` bool stacks or ``.png`` label maps).
- ``superpixel``: weights-free multi-scale Felzenszwalb segments from scikit-image.
- ``levels`` (:mod:`trace3d_ns.data.levels`): weights-free, one Felzenszwalb level per view, drawn
  per view, so objects are whole in some views and split in others (the weights-free source for
  object-level instances).

The configs are plain nerfstudio-style dataclasses; heavy libraries (segment_anything, sam2,
skimage) are imported only when masks are actually computed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Literal, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch

from nerfstudio.configs.base_config import InstantiateConfig

MaskSourceName = Literal["sam", "sam2", "folder", "superpixel", "levels"]
"""Names accepted by ``Trace3DDataManagerConfig.mask_source`` (each is also the name of the
datamanager's config field holding that source's settings)."""

SAM_CHECKPOINT_FILES: Dict[str, str] = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
}
"""Checkpoint file names of the official segment-anything release, per model type."""

SAM_CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/segment_anything/"

WEIGHTS_FREE_SOURCES = (
    "The 'folder' source (precomputed masks: `--pipeline.datamanager.mask-source folder "
    "--pipeline.datamanager.folder.directory DIR`), the 'levels' source (`--pipeline.datamanager.mask-source "
    "levels`: whole objects) and the 'superpixel' source (`--pipeline.datamanager.mask-source superpixel`: "
    "parts) work without any weights."
)
"""The sentence every missing-weights message ends with."""


class MaskSourceError(RuntimeError):
    """A mask source cannot produce masks for an image (bad input files, wrong sizes, ...)."""


class MissingModelFileError(FileNotFoundError):
    """A model file (checkpoint or model config) needed by a mask source is missing."""


class SamCheckpointNotFoundError(MissingModelFileError):
    """The segment-anything checkpoint needed by the ``sam`` mask source is missing."""


class MissingPackageError(ImportError):
    """An optional package needed by a mask source is not installed."""


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """Hex blake2b digest of a file's bytes (used as a content stamp)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


_STAMPS: Dict[Tuple[str, int, int], str] = {}


def model_file_stamp(path: Optional[Path]) -> Optional[str]:
    """Content stamp of a model file (checkpoint, config): :func:`file_digest`, or None if the path
    is unset or not a file.

    Checkpoints are hundreds of MB and every training start needs their stamp for the cache key, so
    digests are remembered per process by (resolved path, size, modification time). The stamp does
    not depend on the file's name or place: moving a checkpoint keeps its cached masks valid, and
    replacing its weights invalidates them.
    """
    if path is None:
        return None
    path = Path(path).expanduser()
    if not path.is_file():
        return None
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _STAMPS:
        _STAMPS[memo] = file_digest(path)
    return _STAMPS[memo]


def as_rgb_uint8(image: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    """Convert an image as cached by nerfstudio (uint8 or float in [0, 1], 3 or 4 channels, numpy
    or torch) to a contiguous RGB uint8 numpy array [H, W, 3]. An alpha channel is dropped."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"Expected an image [H, W, 3 or 4], got {image.shape}")
    image = image[:, :, :3]
    if image.dtype != np.uint8:
        image = np.clip(np.round(image.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def sort_masks_by_area(masks: np.ndarray) -> np.ndarray:
    """[K, H, W] bool masks reordered from the largest to the smallest (stable: ties keep their
    order), so that a source's output does not depend on the generator's internal order."""
    if masks.shape[0] < 2:
        return masks
    areas = masks.reshape(masks.shape[0], -1).sum(1)  # [K]
    return masks[np.argsort(-areas, kind="stable")]


@dataclass
class MaskSourceConfig(InstantiateConfig):
    """Base config of a mask source. ``setup(**kwargs)`` builds the :class:`MaskSource`."""

    _target: Type = field(default_factory=lambda: MaskSource)

    # Fields that cannot change the masks (speed or placement knobs) and so are not part of the
    # cache key.
    _not_in_cache_key: ClassVar[Tuple[str, ...]] = ()

    def cache_settings(self) -> Dict[str, Any]:
        """The settings that determine the masks, as a JSON-able dict (part of the cache key)."""
        out: Dict[str, Any] = {"type": type(self).__name__}
        for f in fields(self):
            if f.name.startswith("_") or f.name in self._not_in_cache_key:
                continue
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


class MaskSource:
    """Produces [K, H, W] bool masks for one image at a time."""

    config: MaskSourceConfig
    needs_raw_geometry: bool = False
    """True if the masks are defined on the image as stored on disk (before undistortion), so the
    caller must undistort them like the image."""

    def __init__(self, config: MaskSourceConfig, **kwargs: Any) -> None:
        self.config = config

    def cache_settings(self) -> Dict[str, Any]:
        """Settings that determine the output (part of the cache key)."""
        return self.config.cache_settings()

    def input_stamp(self, image_path: Path) -> str:
        """Content stamp of any per-image input besides the image itself ("" if none)."""
        return ""

    def check_inputs(self, image_paths: Sequence[Path]) -> None:
        """Fail early, before any heavy work, if inputs for some images are missing."""

    def prepare(self, image_paths: Sequence[Path]) -> None:
        """Called with all the images to be masked before the first of them (after ``check_inputs``),
        for sources whose masks depend on the set of images (e.g. ``levels``' stratified draw)."""

    def __call__(self, image: np.ndarray, image_path: Path) -> np.ndarray:
        """Compute masks.

        Args:
            image: [H, W, 3] uint8 RGB.
            image_path: the image's file (for messages and per-image inputs).

        Returns:
            [K, H, W] bool masks (K may be 0).
        """
        raise NotImplementedError

    def load(self, image_path: Path, expected_hw: Optional[Tuple[int, int]] = None) -> np.ndarray:
        """For sources with ``needs_raw_geometry``: the [K, H, W] bool masks of the image file as stored
        on disk (before undistortion), checked against ``expected_hw``."""
        raise NotImplementedError(f"{type(self).__name__} computes masks from pixels; call it instead")

    def close(self) -> None:
        """Release models / memory once all masks are computed."""


# --------------------------------------------------------------------------------------------
# SAM-family sources: a model from a local checkpoint, prompted with a grid of points
# --------------------------------------------------------------------------------------------


@dataclass
class PromptGridMaskSourceConfig(MaskSourceConfig):
    """Settings shared by the SAM-family sources (``sam``, ``sam2``): a model loaded from a local
    checkpoint and run by its package's automatic mask generator on a grid of point prompts."""

    _target: Type = field(default_factory=lambda: PromptGridMaskSource)
    checkpoint: Optional[Path] = None
    """Local model checkpoint (nothing is ever downloaded)."""
    device: Optional[str] = None
    """Torch device to run the model on; None uses the datamanager's device."""
    points_per_side: int = 32
    """Side of the grid of point prompts (points_per_side**2 prompts per image)."""
    points_per_batch: int = 64
    """Prompts run through the mask decoder at once (memory vs speed; does not change the masks)."""
    min_mask_region_area: int = 0
    """If > 0, remove disconnected regions and holes smaller than this many pixels (uses OpenCV)."""

    _not_in_cache_key: ClassVar[Tuple[str, ...]] = ("device", "points_per_batch")


class PromptGridMaskSource(MaskSource):
    """Shared machinery of the SAM-family sources.

    The model is built once, on first use, on ``config.device`` (else the datamanager's device),
    from the local files the subclass names (:meth:`check_model_files`, :meth:`build_model`), or by
    an injected factory; the cache key carries the content stamps of those files. Masks come back
    ordered from the largest to the smallest.

    Args:
        config: the settings.
        device: device used when ``config.device`` is None.
        build_model: factory ``config -> model`` used instead of the checkpoint (tests and scripts
            inject small random-weight models here); its masks are cached apart from the files'.
    """

    config: PromptGridMaskSourceConfig

    def __init__(
        self,
        config: PromptGridMaskSourceConfig,
        device: Union[str, torch.device] = "cpu",
        build_model: Optional[Callable[[Any], torch.nn.Module]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config)
        self.device = torch.device(config.device if config.device is not None else device)
        self._injected_model = build_model
        self._generator: Any = None

    # -- what a subclass provides ----------------------------------------------------------------

    def check_model_files(self) -> None:
        """Raise a one-paragraph error (:class:`MissingPackageError`, :class:`MissingModelFileError`)
        if a package or file the model needs is missing. Must not import the heavy package."""
        raise NotImplementedError

    def model_file_stamps(self) -> Dict[str, Any]:
        """Content stamps of the model's files, merged into the cache settings (None for a missing file)."""
        return {"checkpoint": model_file_stamp(self.config.checkpoint)}

    def build_model(self) -> torch.nn.Module:
        """The model with the checkpoint's weights (called after :meth:`check_model_files`)."""
        raise NotImplementedError

    def make_generator(self, model: torch.nn.Module) -> Any:
        """The package's automatic mask generator around ``model`` with ``self.config``'s settings."""
        raise NotImplementedError

    def generate(self, generator: Any, rgb: np.ndarray) -> np.ndarray:
        """[K, H, W] bool masks of the [H, W, 3] uint8 RGB image (any order)."""
        records = generator.generate(rgb)
        if not records:
            return np.zeros((0, *rgb.shape[:2]), dtype=bool)
        return np.stack([np.asarray(r["segmentation"], dtype=bool) for r in records])  # [K, H, W]

    # -- shared ----------------------------------------------------------------------------------

    def cache_settings(self) -> Dict[str, Any]:
        settings = self.config.cache_settings()
        if self._injected_model is not None:
            # An injected model is not described by the files: keep its cache entries apart.
            settings["model_factory"] = getattr(self._injected_model, "__qualname__", repr(self._injected_model))
        else:
            settings.update(self.model_file_stamps())
        return settings

    def check_inputs(self, image_paths: Sequence[Path]) -> None:
        if self._injected_model is None:
            self.check_model_files()

    def _ensure_generator(self) -> Any:
        if self._generator is None:
            if self._injected_model is not None:
                model = self._injected_model(self.config)
            else:
                self.check_model_files()
                model = self.build_model()
            model.to(self.device).eval()
            self._generator = self.make_generator(model)
        return self._generator

    def __call__(self, image: np.ndarray, image_path: Path) -> np.ndarray:
        rgb = as_rgb_uint8(image)  # [H, W, 3] RGB, as the SAM packages expect (the authors fed BGR from cv2)
        generator = self._ensure_generator()
        with torch.inference_mode():
            masks = self.generate(generator, rgb)  # [K, H, W]
        return sort_masks_by_area(masks)  # deterministic: large to small

    def close(self) -> None:
        self._generator = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# SAM
# --------------------------------------------------------------------------------------------


@dataclass
class SamMaskSourceConfig(PromptGridMaskSourceConfig):
    """segment-anything automatic mask generation (the paper's source)."""

    _target: Type = field(default_factory=lambda: SamMaskSource)
    model_type: Literal["vit_h", "vit_l", "vit_b"] = "vit_h"
    """SAM backbone; must match the checkpoint (the paper used vit_h)."""
    checkpoint: Optional[Path] = None
    """Local SAM checkpoint, e.g. sam_vit_h_4b8939.pth from the segment-anything release."""
    pred_iou_thresh: float = 0.88
    """Drop masks whose predicted IoU is below this."""
    stability_score_thresh: float = 0.9
    """Drop masks whose stability score is below this (the authors used 0.9)."""


def _missing_checkpoint_message(config: SamMaskSourceConfig) -> str:
    name = SAM_CHECKPOINT_FILES[config.model_type]
    where = "no checkpoint was given" if config.checkpoint is None else f"'{config.checkpoint}' does not exist"
    return (
        f"The 'sam' mask source needs the segment-anything {config.model_type} checkpoint, but {where}. "
        f"Download {name} from the official segment-anything release "
        f"({SAM_CHECKPOINT_URL}{name}, listed under 'Model Checkpoints' in "
        f"github.com/facebookresearch/segment-anything) and pass it with "
        f"`--pipeline.datamanager.sam.checkpoint /path/to/{name}` (and "
        f"`--pipeline.datamanager.sam.model-type {config.model_type}` to match the file). "
        + WEIGHTS_FREE_SOURCES
    )


def build_sam_from_checkpoint(config: SamMaskSourceConfig) -> torch.nn.Module:
    """Build the SAM model named by ``config.model_type`` and load ``config.checkpoint``.

    Raises:
        SamCheckpointNotFoundError: the checkpoint path is unset or missing.
    """
    if config.checkpoint is None or not Path(config.checkpoint).expanduser().is_file():
        raise SamCheckpointNotFoundError(_missing_checkpoint_message(config))
    from segment_anything import sam_model_registry  # heavy, lazy

    path = Path(config.checkpoint).expanduser()
    try:
        return sam_model_registry[config.model_type](checkpoint=str(path))
    except RuntimeError as err:  # state-dict mismatch: usually the wrong model_type for the file
        raise MaskSourceError(
            f"Could not load SAM checkpoint '{path}' as model type {config.model_type}: {err}. "
            f"Check that --pipeline.datamanager.sam.model-type matches the checkpoint "
            f"({', '.join(f'{k}: {v}' for k, v in SAM_CHECKPOINT_FILES.items())})."
        ) from err


def build_tiny_random_sam(config: Optional[SamMaskSourceConfig] = None, img_size: int = 128, dim: int = 32, seed: int = 0) -> torch.nn.Module:
    """A SAM with random weights and a tiny encoder (``img_size`` px input, ``dim``-d, depth 1).

    Its masks are meaningless; it exists so that the ``sam`` code path can run end to end on a CPU
    without downloading weights (tests, smoke runs). Pass it as ``build_sam_model``; use
    ``pred_iou_thresh`` below 0 and ``stability_score_thresh=0`` so that random masks survive.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        patch = 16
        return Sam(
            image_encoder=ImageEncoderViT(
                img_size=img_size, patch_size=patch, embed_dim=dim, depth=1, num_heads=2, out_chans=dim, window_size=0
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=dim,
                image_embedding_size=(img_size // patch, img_size // patch),
                input_image_size=(img_size, img_size),
                mask_in_chans=4,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=2 * dim, num_heads=2),
                transformer_dim=dim,
                iou_head_depth=1,
                iou_head_hidden_dim=16,
            ),
        ).eval()
    finally:
        torch.random.set_rng_state(generator_state)


class SamMaskSource(PromptGridMaskSource):
    """Runs ``SamAutomaticMaskGenerator`` on the RGB image.

    Args:
        config: the settings.
        device: device used when ``config.device`` is None.
        build_sam_model: factory returning a ``segment_anything.modeling.Sam``; defaults to
            :func:`build_sam_from_checkpoint`. Tests inject small random-weight models here.
    """

    config: SamMaskSourceConfig

    def __init__(
        self,
        config: SamMaskSourceConfig,
        device: Union[str, torch.device] = "cpu",
        build_sam_model: Optional[Callable[[SamMaskSourceConfig], torch.nn.Module]] = None,
        **kwargs: Any,
    ) -> None:
        if build_sam_model is build_sam_from_checkpoint:
            build_sam_model = None  # the default: identified by the checkpoint's stamp
        super().__init__(config, device=device, build_model=build_sam_model)

    def check_model_files(self) -> None:
        if self.config.checkpoint is None or not Path(self.config.checkpoint).expanduser().is_file():
            raise SamCheckpointNotFoundError(_missing_checkpoint_message(self.config))

    def build_model(self) -> torch.nn.Module:
        return build_sam_from_checkpoint(self.config)

    def make_generator(self, model: torch.nn.Module) -> Any:
        from segment_anything import SamAutomaticMaskGenerator  # heavy, lazy

        c = self.config
        return SamAutomaticMaskGenerator(
            model,
            points_per_side=c.points_per_side,
            points_per_batch=c.points_per_batch,
            pred_iou_thresh=c.pred_iou_thresh,
            stability_score_thresh=c.stability_score_thresh,
            min_mask_region_area=c.min_mask_region_area,
            output_mode="binary_mask",
        )


# --------------------------------------------------------------------------------------------
# Folder of precomputed masks
# --------------------------------------------------------------------------------------------


@dataclass
class FolderMaskSourceConfig(MaskSourceConfig):
    """Precomputed masks, one file per image named after the image's stem:
    ``<directory>/<stem>.npy`` (bool [K, H, W]) or ``<directory>/<stem>.png`` (uint8/uint16 label
    map, 0 = no mask, every other value one mask). ``.npy`` wins if both exist. Masks are given at
    the size of the image file on disk; with a distorted camera they are undistorted with
    nearest-neighbour sampling like the image."""

    _target: Type = field(default_factory=lambda: FolderMaskSource)
    directory: Path = Path("masks")
    """Folder with the mask files; a relative path is resolved against the scene's data directory."""


def load_label_png(path: Path) -> np.ndarray:
    """Read a single-channel label PNG as an integer array [H, W]."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
            raise MaskSourceError(
                f"Label map {path} has mode {im.mode}; expected a single-channel uint8/uint16 PNG "
                "(0 = no mask, each non-zero id one mask)."
            )
        return np.array(im).astype(np.int64)


def label_map_to_masks(labels: np.ndarray) -> np.ndarray:
    """[H, W] integer labels -> [K, H, W] bool, one mask per non-zero id (ascending)."""
    ids = np.unique(labels)
    ids = ids[ids != 0]
    return labels[None, :, :] == ids[:, None, None]


class FolderMaskSource(MaskSource):
    """Loads masks from ``config.directory``.

    Args:
        config: the settings.
        data_dir: base for a relative ``config.directory``.
    """

    config: FolderMaskSourceConfig
    needs_raw_geometry = True

    def __init__(self, config: FolderMaskSourceConfig, data_dir: Optional[Path] = None, **kwargs: Any) -> None:
        super().__init__(config)
        directory = Path(config.directory).expanduser()
        if not directory.is_absolute() and data_dir is not None:
            directory = Path(data_dir) / directory
        self.directory = directory

    def mask_file(self, image_path: Path) -> Optional[Path]:
        """The mask file for an image, or None if there is none."""
        stem = Path(image_path).stem
        for ext in (".npy", ".png"):
            candidate = self.directory / f"{stem}{ext}"
            if candidate.is_file():
                return candidate
        return None

    def cache_settings(self) -> Dict[str, Any]:
        settings = self.config.cache_settings()
        settings["directory"] = str(self.directory.resolve())
        return settings

    def input_stamp(self, image_path: Path) -> str:
        path = self.mask_file(image_path)
        return "" if path is None else f"{path.name}:{file_digest(path)}"

    def check_inputs(self, image_paths: Sequence[Path]) -> None:
        if not self.directory.is_dir():
            raise MaskSourceError(
                f"Mask folder {self.directory} does not exist (set --pipeline.datamanager.folder.directory; "
                "relative paths are resolved against the data directory)."
            )
        missing = [Path(p).name for p in image_paths if self.mask_file(Path(p)) is None]
        if missing:
            shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise MaskSourceError(
                f"Mask folder {self.directory} has no masks for {len(missing)} of {len(image_paths)} "
                f"images ({shown}); expected <stem>.npy or <stem>.png per image, e.g. "
                f"{self.directory / (Path(missing[0]).stem + '.npy')}."
            )

    def load(self, image_path: Path, expected_hw: Optional[Tuple[int, int]] = None) -> np.ndarray:
        """Read the masks of one image.

        Args:
            image_path: the image file whose stem names the mask file.
            expected_hw: if given, the size the masks must have.

        Returns:
            [K, H, W] bool.
        """
        image_path = Path(image_path)
        path = self.mask_file(image_path)
        if path is None:
            raise MaskSourceError(
                f"No masks for image '{image_path.name}': expected {self.directory / (image_path.stem + '.npy')} "
                f"or {self.directory / (image_path.stem + '.png')}."
            )
        try:
            if path.suffix == ".npy":
                masks = np.load(path, allow_pickle=False)
                if masks.ndim == 2:
                    masks = masks[None]
                if masks.ndim != 3:
                    raise MaskSourceError(f"{path} has shape {masks.shape}; expected bool [K, H, W]")
                masks = masks.astype(bool, copy=False)
            else:
                masks = label_map_to_masks(load_label_png(path))
        except MaskSourceError as err:
            raise MaskSourceError(f"Bad masks for image '{image_path.name}': {err}") from err
        except (OSError, ValueError) as err:
            raise MaskSourceError(f"Could not read masks for image '{image_path.name}' from {path}: {err}") from err
        if expected_hw is not None and tuple(masks.shape[1:]) != tuple(expected_hw):
            raise MaskSourceError(
                f"Masks for image '{image_path.name}' ({path}) are {masks.shape[1]}x{masks.shape[2]} (HxW) but the "
                f"image is {expected_hw[0]}x{expected_hw[1]}; masks must match the image file's resolution."
            )
        return masks

    def __call__(self, image: np.ndarray, image_path: Path) -> np.ndarray:
        return self.load(image_path, expected_hw=(int(image.shape[0]), int(image.shape[1])))


# --------------------------------------------------------------------------------------------
# Superpixels
# --------------------------------------------------------------------------------------------


@dataclass
class SuperpixelMaskSourceConfig(MaskSourceConfig):
    """Weights-free masks: Felzenszwalb segments at several scales, overlapping at several
    granularities like SAM's part / object masks."""

    _target: Type = field(default_factory=lambda: SuperpixelMaskSource)
    scales: Tuple[float, ...] = (100.0, 500.0)
    """Felzenszwalb ``scale`` per level (larger = bigger segments); each level adds one mask per segment."""
    sigma: float = 0.8
    """Gaussian pre-smoothing of the image."""
    min_size: int = 50
    """Minimum segment size in pixels (enforced by post-processing)."""


class SuperpixelMaskSource(MaskSource):
    """Runs scikit-image ``felzenszwalb`` once per scale."""

    config: SuperpixelMaskSourceConfig

    def __init__(self, config: SuperpixelMaskSourceConfig, **kwargs: Any) -> None:
        super().__init__(config)
        if len(config.scales) < 1:
            raise ValueError("SuperpixelMaskSourceConfig.scales needs at least one scale")

    def __call__(self, image: np.ndarray, image_path: Path) -> np.ndarray:
        from skimage.segmentation import felzenszwalb  # lazy

        rgb = as_rgb_uint8(image)  # [H, W, 3]
        masks: List[np.ndarray] = []
        for scale in self.config.scales:
            labels = felzenszwalb(rgb, scale=float(scale), sigma=self.config.sigma, min_size=self.config.min_size)
            n = int(labels.max()) + 1
            masks.append(labels[None, :, :] == np.arange(n)[:, None, None])  # [n, H, W]
        return np.concatenate(masks, axis=0)  # [K, H, W]


def make_mask_source(
    name: MaskSourceName,
    configs: Dict[str, MaskSourceConfig],
    **kwargs: Any,
) -> MaskSource:
    """Instantiate the source called ``name`` from ``configs`` (name -> config); ``kwargs`` go to
    every source's constructor (``device``, ``data_dir``, ...), unknown ones are ignored."""
    if name not in configs:
        raise ValueError(f"Unknown mask source {name!r}; choose one of {sorted(configs)}")
    return configs[name].setup(**kwargs)
