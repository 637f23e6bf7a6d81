"""`trace3d-prompt`: select an object by point prompts in one training view (online self-prompting).

    trace3d-prompt --load-config CONFIG --view I --points X,Y [X,Y ...] [--negative X,Y ...]
                   [--output-dir DIR] [--sam-checkpoint PATH --sam-model-type vit_h]

Masks come from SAM's point prompts when a checkpoint is given, otherwise from the run's instance
patches under the points (weights-free). Writes `selection.ply` (3DGS layout), `masks/<view>.png`
(the mask used in each visited view), `renders/<view>.png` (the selection rendered alone on every
training view) and `prompt.json` (prompts, visiting order, counts).

Memory: each view's contributions are computed when self-prompting visits it and dropped after
(one view's pairs at a time); training images, which nerfstudio may cache on the GPU, are copied
to the host one at a time, only for SAM.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Dict, List, Optional, Tuple


def _point(text: str) -> Tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y (pixels), got {text!r}") from None
    return x, y


class HostImages(Sequence):
    """The datamanager's cached training images as uint8 [H, W, 3] numpy arrays, converted on access
    (from any device: nerfstudio caches them on the GPU by default)."""

    def __init__(self, cached: Sequence[Dict[str, Any]]) -> None:
        self.cached = cached

    def __len__(self) -> int:
        return len(self.cached)

    def __getitem__(self, index: int):  # type: ignore[override]
        import torch

        image = self.cached[index]["image"].detach()[..., :3]
        if image.dtype != torch.uint8:
            image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return image.cpu().numpy()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trace3d-prompt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-config", type=Path, required=True, help="config.yml of a trace3d run")
    p.add_argument("--view", type=int, required=True, help="training view index of the prompt points")
    p.add_argument("--points", type=_point, nargs="+", required=True, metavar="X,Y", help="positive points (pixels)")
    p.add_argument("--negative", type=_point, nargs="*", default=[], metavar="X,Y", help="negative points (pixels)")
    p.add_argument("--output-dir", type=Path, default=Path("prompt_out"), help="where to write the results")
    p.add_argument("--sam-checkpoint", type=Path, default=None, help="SAM checkpoint; without it, patches are used")
    p.add_argument("--sam-model-type", default="vit_h", choices=["vit_h", "vit_l", "vit_b"])
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if not args.load_config.is_file():
        print(f"trace3d-prompt: error: config file not found: {args.load_config}", file=sys.stderr)
        return 2

    import numpy as np
    from PIL import Image

    from nerfstudio.utils.eval_utils import eval_setup
    from trace3d_ns.export.ply import write_gaussian_ply
    from trace3d_ns.prompting import PatchPromptMasker, SamPromptMasker, self_prompt
    from trace3d_ns.selection import camera_contributions, render_subset_alpha

    _, pipeline, _, _ = eval_setup(args.load_config, test_mode="val")
    model, dm = pipeline.model, pipeline.datamanager
    cameras = dm.train_dataset.cameras
    if not 0 <= args.view < len(cameras):
        print(f"trace3d-prompt: error: --view must be in [0, {len(cameras) - 1}]", file=sys.stderr)
        return 2
    if args.sam_checkpoint is not None:
        from segment_anything import SamPredictor

        from trace3d_ns.data.mask_sources import SamMaskSourceConfig, build_sam_from_checkpoint

        sam = build_sam_from_checkpoint(SamMaskSourceConfig(model_type=args.sam_model_type, checkpoint=args.sam_checkpoint))
        masker = SamPromptMasker(SamPredictor(sam.to(model.device)), HostImages(dm.cached_train))
    else:
        masker = PatchPromptMasker(dm.train_patch_maps())

    def view_contributions(v: int):  # every view is visited once: computed on demand, not kept
        return camera_contributions(model, cameras[v : v + 1])

    try:
        result = self_prompt(
            view_contributions, model.num_points, masker, args.view, args.points, args.negative,
            views=range(len(cameras)), camera_centres=cameras.camera_to_worlds[:, :3, 3], device=model.device,
        )
    except ValueError as err:
        print(f"trace3d-prompt: error: {err}", file=sys.stderr)
        return 2

    out = args.output_dir
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "renders").mkdir(parents=True, exist_ok=True)
    write_gaussian_ply(out / "selection.ply", {k: v[result.selected] for k, v in model.gauss_params.items()})
    for v, mask in result.masks.items():
        Image.fromarray(mask.cpu().numpy().astype(np.uint8) * 255).save(out / "masks" / f"{v:05d}.png")
    for v in range(len(cameras)):
        alpha = render_subset_alpha(model, cameras[v : v + 1], result.selected)
        Image.fromarray((alpha.clamp(0, 1) * 255).byte().cpu().numpy()).save(out / "renders" / f"{v:05d}.png")
    summary = {
        "view": args.view,
        "points": args.points,
        "negative": args.negative,
        "mask_source": "sam" if args.sam_checkpoint else "patches",
        "visited_views": result.order,
        "prompts": {str(v): p for v, p in result.prompts.items()},
        "selected_gaussians": int(result.selected.sum()),
        "total_gaussians": model.num_points,
    }
    (out / "prompt.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"selected {summary['selected_gaussians']} of {model.num_points} Gaussians over "
          f"{len(result.order) + 1} views; wrote {out / 'selection.ply'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
