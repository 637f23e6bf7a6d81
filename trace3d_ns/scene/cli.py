"""``trace3d-scene``: write a procedural demo scene in nerfstudio format (see :mod:`.generate`)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from trace3d_ns.scene.generate import LIMITS, SceneSpec, generate_scene


def _bounded_int(field: str) -> Callable[[str], int]:
    """argparse ``type`` parsing an int within ``LIMITS[field]``."""
    low, high = LIMITS[field]

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface; defaults come from :class:`SceneSpec`."""
    d = SceneSpec()
    parser = argparse.ArgumentParser(
        prog="trace3d-scene",
        description="Ray-cast a textured multi-object demo scene (images, poses, seed points, "
        "GT instance ids, objects cast alone on the test views, optional SAM-like masks) in nerfstudio-data format.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--objects", type=_bounded_int("num_objects"), default=d.num_objects, help="number of objects")
    parser.add_argument("--views", type=_bounded_int("num_views"), default=d.num_views, help="number of views")
    parser.add_argument("--size", type=_bounded_int("image_size"), default=d.image_size, help="image side in pixels")
    parser.add_argument("--seed", type=_bounded_int("seed"), default=d.seed, help="random seed")
    parser.add_argument(
        "--test-every", type=_bounded_int("test_every"), default=d.test_every, help="every M-th view is a test view"
    )
    parser.add_argument("--points", type=_bounded_int("num_points"), default=d.num_points, help="seed point count")
    parser.add_argument(
        "--supersample", type=_bounded_int("supersample"), default=d.supersample, help="anti-aliasing rays per axis"
    )
    parser.add_argument("--sam-like-masks", action="store_true", help="also write sam_masks/<stem>.npy")
    parser.add_argument(
        "--clutter",
        action="store_true",
        help="cluttered layout (meant for 8-12 objects): objects touch, stack and lean on each other, some share a "
        "texture across their contact, tables and lamps have thin parts",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty directory that is not a previous scene"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments, generate the scene and print a one-line summary."""
    parser = build_parser()
    args = parser.parse_args(argv)
    spec = SceneSpec(
        num_objects=args.objects,
        num_views=args.views,
        image_size=args.size,
        seed=args.seed,
        test_every=args.test_every,
        num_points=args.points,
        sam_like_masks=args.sam_like_masks,
        supersample=args.supersample,
        clutter=args.clutter,
    )
    start = time.perf_counter()
    try:
        out = generate_scene(args.out, spec, overwrite=args.overwrite)
    except (FileExistsError, NotADirectoryError) as err:
        parser.error(str(err))
    num_test = len(spec.test_indices())
    print(
        f"wrote {out}: {spec.num_views} views ({spec.num_views - num_test} train, {num_test} test), "
        f"{spec.num_objects} {'cluttered ' if spec.clutter else ''}objects, {spec.image_size}px in {time.perf_counter() - start:.1f}s"
    )


if __name__ == "__main__":
    main()
