"""One PNG that shows what a trained trace3d model does, for a few test views.

Columns: the test image, the RGB render, the instance render (each Gaussian's instance label,
palette colours), the feature PCA, then the largest extracted objects, each one's Gaussians
rendered alone (the background, the instance seen most along the first view's border, is left
out; pixels of no instance do not count). Rows: test views spread over the held-out set.

    python -m trace3d_ns.figure --load-config outputs/.../config.yml --out overview.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np


def _tile(image: np.ndarray, size: int) -> np.ndarray:
    """[H, W, 3] float in [0, 1] or uint8 -> [size, size * W / H, 3] uint8."""
    from PIL import Image

    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image[..., :3]).resize((max(1, round(size * w / h)), size), Image.NEAREST))


def compose(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str], size: int = 160, pad: int = 4) -> np.ndarray:
    """A grid of images (rows of equal length) under a title line per column. [H, W, 3] uint8"""
    from PIL import Image, ImageDraw

    tiles = [[_tile(im, size) for im in row] for row in rows]
    col_w = [max(t[c].shape[1] for t in tiles) for c in range(len(titles))]
    header = 18
    height = header + len(tiles) * (size + pad)
    width = sum(col_w) + pad * (len(col_w) + 1)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = pad
    for c, title in enumerate(titles):
        draw.text((x, 3), title, fill=(0, 0, 0))
        for r, row in enumerate(tiles):
            canvas.paste(Image.fromarray(row[c]), (x, header + r * (size + pad)))
        x += col_w[c] + pad
    return np.asarray(canvas)


def background_instance(ids: torch.Tensor) -> int:
    """The instance seen most along the border of an [H, W] instance-id map; pixels of no instance
    (0, e.g. the sky) do not count. 0 when the border shows none."""
    import torch

    border = torch.cat([ids[0], ids[-1], ids[:, 0], ids[:, -1]])
    border = border[border > 0]
    return int(torch.mode(border).values) if border.numel() else 0


def overview(pipeline, num_views: int = 3, num_objects: int = 3) -> np.ndarray:
    """The overview grid of a loaded pipeline (see the module docstring)."""
    import torch

    from trace3d_ns.evaluation.harness import render_subset_rgb

    model = pipeline.model
    dataset = pipeline.datamanager.eval_dataset
    picks = np.linspace(0, len(dataset) - 1, min(num_views, len(dataset))).round().astype(int)
    labels = model.instance_labels
    objects: List[int] = []
    if labels.numel() == model.num_points:
        from trace3d_ns.viewer_controls import top_instance_ids

        first = top_instance_ids(model, dataset.cameras[int(picks[0]) : int(picks[0]) + 1].to(model.device))  # [H, W]
        background = background_instance(first)
        ids, counts = torch.unique(labels[(labels > 0) & (labels != background)], return_counts=True)
        objects = ids[torch.argsort(counts, descending=True)][:num_objects].tolist()
    titles = ["test image", "render", "instances", "feature PCA"] + [f"object {i}" for i in objects]
    rows = []
    model.eval()
    with torch.no_grad():
        for i in picks:
            camera = dataset.cameras[int(i) : int(i) + 1].to(model.device)
            out = model.get_outputs_for_camera(camera)
            blank = np.zeros_like(out["rgb"].cpu().numpy())
            row = [
                dataset.get_image_float32(int(i)).numpy()[..., :3],
                out["rgb"].cpu().numpy(),
                out["instance"].cpu().numpy() if "instance" in out else blank,
                out["feature_pca"].cpu().numpy() if "feature_pca" in out else blank,
            ]
            for obj in objects:
                alone = render_subset_rgb(model, camera, labels == obj).cpu().numpy()
                row.append(alone + (alone.sum(-1, keepdims=True) == 0))  # on white
            rows.append(row)
    return compose(rows, titles)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trace3d_ns.figure", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-config", type=Path, required=True, help="config.yml of a trained trace3d run")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--views", type=int, default=3, help="test views (rows)")
    parser.add_argument("--objects", type=int, default=3, help="largest instances shown alone (columns)")
    args = parser.parse_args(argv)
    if not args.load_config.is_file():
        print(f"trace3d figure: error: config file not found: {args.load_config}", file=sys.stderr)
        return 2
    from PIL import Image

    from nerfstudio.utils.eval_utils import eval_setup

    _, pipeline, _, _ = eval_setup(args.load_config, test_mode="test")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overview(pipeline, args.views, args.objects)).save(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
