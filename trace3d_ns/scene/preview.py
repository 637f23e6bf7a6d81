"""A picture of one view of a generated scene: the image, its ground-truth instance map, its SAM-like
masks over the image and, on test views, every object cast alone (amodal outlines).

    python -m trace3d_ns.scene.preview --scene DIR --view I --out preview.png [--scale 2]
"""

from __future__ import annotations

import argparse
import colorsys
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from trace3d_ns.scene.generate import AMODAL_DIR, GT_DIR, IMAGE_DIR, SAM_DIR, SCENE_FILE

CAPTION = 14


def palette(count: int) -> np.ndarray:
    """Distinct colours (golden-ratio hues), row 0 black. [count, 3] uint8"""
    hues = (np.arange(count) * 0.618034) % 1.0
    colours = [colorsys.hsv_to_rgb(h, 0.75, 0.95) for h in hues]
    out = (np.array(colours) * 255).round().astype(np.uint8)
    out[0] = 0
    return out


def _outline(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels that touch a pixel outside it. [H, W] bool"""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def overlay_masks(image: np.ndarray, masks: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Each mask [K, H, W] tinted over ``image`` [H, W, 3] in its own colour, outlined. [H, W, 3] uint8"""
    out = image.astype(np.float64)
    colours = palette(len(masks) + 1)[1:]
    for mask, colour in zip(masks, colours):
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
    for mask, colour in zip(masks, colours):
        out[_outline(mask)] = colour
    return out.round().astype(np.uint8)


def preview(scene: Path, view: int) -> Image.Image:
    """The panels of one view side by side, captioned."""
    meta = json.loads((scene / SCENE_FILE).read_text())
    name = meta["file_names"][view]
    image = np.asarray(Image.open(scene / IMAGE_DIR / name).convert("RGB"))
    ids = np.asarray(Image.open(scene / GT_DIR / name)).astype(np.int64)
    colours = palette(max(int(ids.max()), len(meta["objects"])) + 1)
    panels: List[np.ndarray] = [image, colours[ids]]
    captions = [name, "GT instances"]
    sam = scene / SAM_DIR / f"{Path(name).stem}.npy"
    if sam.is_file():
        masks = np.load(sam)
        panels.append(overlay_masks(image, masks))
        captions.append(f"SAM-like masks ({len(masks)})")
    alone = scene / AMODAL_DIR
    if view in meta.get("test_views", []) and alone.is_dir():
        amodal = np.zeros_like(image)
        for obj in meta["objects"]:
            mask = np.asarray(Image.open(alone / str(obj["id"]) / name)) > 127
            amodal[_outline(mask)] = colours[obj["id"]]
        panels.append(amodal)
        captions.append("each object alone (outlines)")
    h, w = image.shape[:2]
    sheet = Image.new("RGB", (len(panels) * (w + 2), h + CAPTION), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (panel, caption) in enumerate(zip(panels, captions)):
        sheet.paste(Image.fromarray(panel), (k * (w + 2), CAPTION))
        draw.text((k * (w + 2) + 2, 1), caption, fill=(0, 0, 0))
    return sheet


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trace3d_ns.scene.preview", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scene", type=Path, required=True, help="a folder written by trace3d-scene")
    parser.add_argument("--view", type=int, default=0, help="view index (default 0, a test view)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling of the picture")
    args = parser.parse_args(argv)
    if not (args.scene / SCENE_FILE).is_file():
        parser.error(f"{args.scene} is not a generated scene (no {SCENE_FILE})")
    meta = json.loads((args.scene / SCENE_FILE).read_text())
    if not 0 <= args.view < len(meta["file_names"]):
        parser.error(f"--view must be in 0..{len(meta['file_names']) - 1}")
    sheet = preview(args.scene, args.view)
    sheet = sheet.resize((sheet.width * args.scale, sheet.height * args.scale), Image.NEAREST)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
