"""Viewer controls for Trace3D: click-to-select an object, similarity threshold, clear, export, PCA refit.

`InstanceViewerControls` is an `nn.Module` attribute of the model (no parameters, no buffers), so
nerfstudio's viewer finds its elements by walking the model's nn.Module attributes, under the
folder "Custom Elements/<attribute name>". It holds the model through a weak reference stored
under a `_` name, which the viewer walker and `nn.Module` both skip.

GUI elements (attribute -> label; the viewer lists them alphabetically by attribute):

- `pca_refit` "Recompute feature PCA": refits `model.feature_pca` on the current features.
- `select_by_click` "Select object (click)": arms a one-shot click in the 3D view ("Selected"
  says so; while armed, dragging does not orbit the camera). Pressing it again re-arms, e.g.
  after a page reload.
- `select_mode` "Select by": `auto` (`selection.auto_mode`: feature within the clicked instance
  with features and labels, features alone before GIT has run, else instance labels),
  `feature` (similarity to the clicked pixel's rendered feature; only offered with a feature
  field), `traced` (that similarity per pixel of every training view, traced back: leaves out
  Gaussians straddling the border; renders the training views, so a click takes longer; its
  result is kept until the click, threshold or Gaussians change) or `instance` (the instance label
  voted by blending weight at the click; needs Gaussian Instance Tracing's labels).
- `select_status` "Selected": number of selected Gaussians (read-only).
- `select_threshold` "Similarity threshold": cosine similarity >= threshold between the clicked
  pixel's rendered feature q and Gaussian i's selection feature (its rendered features traced back,
  ``model.selection_features()``) selects it; moving it re-applies to the last click.
- `selection_clear` "Clear selection".
- `selection_export` "Export selection (.ply)": writes the selected Gaussians as an ns-export PLY.
- `selection_export_dir` "Export directory": empty means `<run dir>/selections`.
- `viewer_control`: the `ViewerControl` that delivers the click.

Extra outputs for the viewer's output dropdown (`extra_outputs`): `feature_pca`, `instance`,
`selection`; see `InstanceViewerControls.extra_outputs`.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch
from torch import Tensor

from nerfstudio.cameras.cameras import Cameras
from nerfstudio.utils.rich_utils import CONSOLE
from nerfstudio.viewer.viewer_elements import (
    ViewerButton,
    ViewerClick,
    ViewerControl,
    ViewerDropdown,
    ViewerSlider,
    ViewerText,
)
from trace3d_ns.export.ply import PARAM_KEYS, write_gaussian_ply
from trace3d_ns.features.palette import colorize_ids
from trace3d_ns.selection import (
    FEATURE_THRESHOLD,
    auto_mode,
    camera_contributions,
    has_instance_labels,
    instance_at,
    pixel_feature,
    pixel_feature_and_instance,
    render_subset_alpha,
    select_by_feature,
    select_by_traced_feature,
    within_instance,
)

if TYPE_CHECKING:
    from trace3d_ns.model import Trace3DModel

CLICK_IMAGE_HEIGHT = 256
"""Height in pixels of the viewer camera a click is resolved in (its width follows the aspect ratio)."""
ARMED = "click an object in the view"
"""The "Selected" status while a click is awaited."""
HIGHLIGHT = (1.0, 0.55, 0.0)
"""Tint of the selected object in the `selection` output."""


def click_pixel(camera: Cameras, screen_pos: Tuple[float, float]) -> Tuple[int, int]:
    """The pixel (x, y) of `camera`'s W x H image under a click at `screen_pos`.

    `screen_pos` is in OpenCV image coordinates normalised to [0, 1] (origin top-left, x right,
    y down), over the whole rendered view, so the click is at (x * W, y * H) pixels.
    """
    width, height = int(camera.width.flatten()[0]), int(camera.height.flatten()[0])
    return min(int(screen_pos[0] * width), width - 1), min(int(screen_pos[1] * height), height - 1)


@torch.no_grad()
def top_instance_ids(model: "Trace3DModel", camera: Cameras) -> Tensor:
    """Per pixel, the instance label of the Gaussian with the largest blending weight (0: none). [H, W]"""
    c = camera_contributions(model, camera)
    num_pixels = c.height * c.width
    best = torch.zeros(num_pixels, device=c.weights.device).scatter_reduce(0, c.pixel_ids, c.weights, "amax")
    top = c.weights >= best[c.pixel_ids]  # [P] pairs holding their pixel's largest weight
    ids = torch.zeros(num_pixels, dtype=torch.long, device=c.weights.device)
    ids[c.pixel_ids[top]] = model.instance_labels[c.gaussian_ids[top]]
    return ids.view(c.height, c.width)


def highlight(rgb: Tensor, alpha: Tensor) -> Tensor:
    """`rgb` [H, W, 3] dimmed, with the region of `alpha` [H, W] tinted by `HIGHLIGHT`. [H, W, 3]"""
    a = alpha[..., None]
    tinted = 0.5 * rgb + 0.5 * rgb.new_tensor(HIGHLIGHT)
    return torch.lerp(0.3 * rgb, tinted, a)


def _next_free(directory: Path, stem: str, suffix: str) -> Path:
    """The first `<stem>_NNN<suffix>` in `directory` that does not exist yet."""
    return next(p for i in itertools.count() if not (p := directory / f"{stem}_{i:03d}{suffix}").exists())


class InstanceViewerControls(torch.nn.Module):
    """Click selection, threshold, clear/export and PCA refit for a `Trace3DModel` in the viewer.

    Built as `InstanceViewerControls(model)` in the model's `populate_modules`. Adds nothing to the
    model's state_dict. Every callback also works without a viewer (headless tests call them).
    """

    def __init__(self, model: "Trace3DModel") -> None:
        super().__init__()
        object.__setattr__(self, "_model_ref", weakref.ref(model))
        self._query: Optional[Tensor] = None  # [D] rendered feature at the last click (feature mode)
        self._label: Optional[int] = None  # instance label picked by the last click (instance, feature_instance)
        self._traced = False  # the last click selects by traced feature predictions
        self._traced_mask: Optional[Tuple[tuple, Tensor]] = None  # (cache key, its selection)
        self.viewer_control = ViewerControl()
        self.pca_refit = ViewerButton("Recompute feature PCA", cb_hook=self.on_pca_refit)
        self.select_by_click = ViewerButton("Select object (click)", cb_hook=self.on_select_by_click)
        self.select_mode = ViewerDropdown(
            "Select by", "auto",
            ["auto", "feature", "traced", "instance", "feature_instance"] if model.has_features else ["auto", "instance"],
            hint="auto: feature similarity within the clicked instance when the model has features and "
                 "instance labels, feature similarity with features only, else instance labels",
        )  # fmt: skip
        self.select_status = ViewerText("Selected", "nothing", disabled=True)
        self.select_threshold = ViewerSlider(
            "Similarity threshold", FEATURE_THRESHOLD, 0.0, 1.0, 0.01, cb_hook=self.on_threshold,
            hint="Select Gaussians whose feature similarity to the clicked pixel is at least this",
        )  # fmt: skip
        self.selection_clear = ViewerButton("Clear selection", cb_hook=self.on_clear)
        self.selection_export = ViewerButton("Export selection (.ply)", cb_hook=self.on_export)
        self.selection_export_dir = ViewerText(
            "Export directory", "", hint="Where exported selections go; empty: <run dir>/selections"
        )

    @property
    def _model(self) -> "Trace3DModel":
        model = self._model_ref()
        if model is None:
            raise RuntimeError("the model of these viewer controls no longer exists")
        return model

    # ---- selection ----------------------------------------------------------------------------
    def selection(self) -> Optional[Tensor]:
        """The selected Gaussians [N] bool, or None when nothing was clicked.

        Derived from the last click on every call, so it follows the threshold slider and stays
        valid when densification changes the number of Gaussians.
        """
        model = self._model
        if self._query is not None and self._traced:
            key = (id(self._query), self.select_threshold.value, model.selection_cache_key())
            if self._traced_mask is None or self._traced_mask[0] != key:
                self._traced_mask = (key, select_by_traced_feature(model, self._query, self.select_threshold.value))
            return self._traced_mask[1]
        if self._query is not None:
            # feature_instance keeps the clicked label (self._label); feature mode leaves it None
            return within_instance(model, select_by_feature(model, self._query, self.select_threshold.value), self._label)
        if self._label is not None and has_instance_labels(model):
            return model.instance_labels == self._label
        return None

    @torch.no_grad()
    def on_click(self, click: ViewerClick, camera: Cameras) -> None:
        """Select the object under `click.screen_pos` in `camera` (the viewer camera of the click).

        In feature mode the query is the rendered feature at the click and the selection is every
        Gaussian within the similarity threshold. In instance mode the instance label voted by
        blending weight at the click (`instance_at`) selects its Gaussians. In feature_instance mode
        both are kept: the feature selection within the clicked instance label. `auto` is
        `selection.auto_mode` of the model at the click.
        """
        model = self._model
        xy = click_pixel(camera, click.screen_pos)
        mode = self.select_mode.value
        if mode == "auto":
            mode = auto_mode(model)
        try:
            if mode in ("feature", "traced"):
                self._query, self._label = pixel_feature(model, camera, xy), None
                self._traced, self._traced_mask = mode == "traced", None
            elif mode == "feature_instance":  # without labels (or none at the click): feature selection
                (self._query, self._label), self._traced = pixel_feature_and_instance(model, camera, xy), False
            else:
                self._query, self._label = None, instance_at(model, camera, xy)
        except ValueError as err:  # nothing rendered there, or no labels to vote with
            CONSOLE.print(f"[yellow]Nothing selected: {err}")
            return
        self._report()

    def on_threshold(self, _: ViewerSlider) -> None:
        """Slider moved: the selection is re-derived from the last click; refresh the count."""
        self._report()

    def on_clear(self, _: Optional[ViewerButton] = None) -> None:
        """Forget the last click."""
        self._query = self._label = self._traced_mask = None
        self._report()

    def _report(self) -> None:
        mask = self.selection()
        self.select_status.value = "nothing" if mask is None else f"{int(mask.sum())} Gaussians"

    # ---- export and PCA -----------------------------------------------------------------------
    @torch.no_grad()
    def on_export(self, _: Optional[ViewerButton] = None) -> Optional[Path]:
        """Write the selected Gaussians to `<export dir>/selection_NNN.ply`; returns its path."""
        mask = self.selection()
        if mask is None or not mask.any():
            CONSOLE.print("[yellow]Nothing selected to export")
            return None
        directory = self._export_dir()
        directory.mkdir(parents=True, exist_ok=True)
        path = _next_free(directory, "selection", ".ply")
        params = self._model.gauss_params
        written = write_gaussian_ply(path, {k: params[k][mask] for k in PARAM_KEYS})
        CONSOLE.print(f"Exported {int(written.sum())} of {int(mask.sum())} selected Gaussians to {path}")
        return path

    def _export_dir(self) -> Path:
        """The export directory field, or `<run dir>/selections` (the current directory's without a viewer)."""
        if self.selection_export_dir.value.strip():
            return Path(self.selection_export_dir.value.strip()).expanduser()
        viewer = getattr(self.viewer_control, "viewer", None)
        run_dir = viewer.log_filename.parent if viewer is not None else Path.cwd()
        return run_dir / "selections"

    def on_pca_refit(self, _: Optional[ViewerButton] = None) -> None:
        """Refit `model.feature_pca` on the current per-Gaussian features."""
        model = self._model
        if not model.has_features:
            CONSOLE.print("[yellow]This model has no feature field to fit a PCA on")
            return
        model.feature_pca.fit(model.gauss_params["features"].detach())

    # ---- viewer click -------------------------------------------------------------------------
    def on_select_by_click(self, _: Optional[ViewerButton] = None) -> None:
        """Arm a one-shot click in the 3D view (the viewer only delivers clicks once this runs)."""
        if getattr(self.viewer_control, "viewer", None) is None:
            CONSOLE.print("[yellow]Click selection needs the viewer")
            return
        self.viewer_control.register_pointer_cb("click", self._on_viewer_click)  # replaces an armed one
        self.select_status.value = ARMED

    def _on_viewer_click(self, click: ViewerClick) -> None:
        self.viewer_control.unregister_pointer_cb()  # one-shot: give the mouse back to the camera
        camera = self._viewer_camera()
        if camera is None:
            return
        viewer = self.viewer_control.viewer
        with viewer.train_lock if viewer.train_lock is not None else contextlib.nullcontext():
            self.on_click(click, camera)
        viewer._trigger_rerender()  # pointer callbacks, unlike GUI callbacks, are not followed by a re-render

    def _viewer_camera(self) -> Optional[Cameras]:
        """The first client's current camera, `CLICK_IMAGE_HEIGHT` pixels high at its aspect ratio."""
        clients = self.viewer_control.viser_server.get_clients()
        if not clients:
            return None
        aspect = next(iter(clients.values())).camera.aspect
        return self.viewer_control.get_camera(CLICK_IMAGE_HEIGHT, round(CLICK_IMAGE_HEIGHT * aspect))

    # ---- outputs ------------------------------------------------------------------------------
    def displayed(self, output: str) -> bool:
        """Whether the viewer shows `output` (as the output type, or the split one when split is on);
        True without a viewer (headless callers get every output)."""
        viewer = getattr(self.viewer_control, "viewer", None)
        if viewer is None:
            return True
        panel = viewer.control_panel
        return output == panel.output_render or (bool(panel.split) and output == panel.split_output_render)

    @torch.no_grad()
    def extra_outputs(self, camera: Cameras, outputs: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Viewer outputs for `camera`, at the resolution of `outputs["rgb"]`; only those computable.

        - `feature_pca` [H, W, 3] float: `outputs["feature"]` through `model.feature_pca` (fitted
          once, lazily, on the per-Gaussian features; refit with the button), when features render.
        - `instance` [H, W, 3] float: the palette colour of the label of each pixel's
          highest-weight Gaussian (black: none), when `model.instance_labels` covers every Gaussian.
          In the viewer it is computed (a contribution pass) only while it is the displayed output
          (or the split one); otherwise the key holds a black placeholder, so the dropdown still
          offers it.
        - `selection` [H, W, 3] float: `outputs["rgb"]` dimmed, the selected object tinted, when
          something is selected (otherwise nothing is computed).
        """
        model = self._model
        extra: Dict[str, Tensor] = {}
        if "feature" in outputs:
            if not model.feature_pca.fitted:
                self.on_pca_refit()
            extra["feature_pca"] = model.feature_pca.project(outputs["feature"])
        if has_instance_labels(model):
            if self.displayed("instance"):
                extra["instance"] = colorize_ids(top_instance_ids(model, camera))
            else:
                height, width = outputs["rgb"].shape[:2]
                extra["instance"] = outputs["rgb"].new_zeros(1, 1, 3).expand(height, width, 3)
        mask = self.selection()
        if mask is not None and mask.any():
            extra["selection"] = highlight(outputs["rgb"], render_subset_alpha(model, camera, mask))
        return extra
