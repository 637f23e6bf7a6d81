"""Tests for the demo scene generator ``trace3d-scene`` (trace3d_ns.scene)."""

from __future__ import annotations

import colorsys
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from trace3d_ns.scene.cli import main
from trace3d_ns.scene.generate import (
    SceneSpec,
    generate_scene,
    layout_scene,
    make_cameras,
    make_sam_like_masks,
    render_view,
)

torch.set_num_threads(1)

SPEC = SceneSpec(num_objects=4, num_views=6, image_size=48, seed=3, test_every=3, num_points=600, sam_like_masks=True)
TEST_NAMES = ["frame_00000.png", "frame_00003.png"]


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small generated scene shared by the read-only tests."""
    return generate_scene(tmp_path_factory.mktemp("scene") / "demo", SPEC)


def _digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    files = [p for p in root.rglob("*") if p.is_file()]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _gt(scene: Path, name: str) -> np.ndarray:
    """Ground-truth instance ids [H, W]."""
    return np.asarray(Image.open(scene / "gt_instances" / name)).astype(np.int64)


def _names(scene: Path) -> list[str]:
    return [Path(f["file_path"]).name for f in _json(scene / "transforms.json")["frames"]]


def test_files_and_json_structure(scene: Path) -> None:
    meta = _json(scene / "transforms.json")
    assert meta["camera_model"] == "OPENCV"
    assert (meta["w"], meta["h"], meta["cx"], meta["cy"]) == (48, 48, 24.0, 24.0)
    assert meta["fl_x"] == meta["fl_y"] > 0 and all(meta[k] == 0.0 for k in ("k1", "k2", "p1", "p2"))
    assert meta["ply_file_path"] == "sparse_pc.ply" and (scene / "sparse_pc.ply").is_file()
    paths = [f["file_path"] for f in meta["frames"]]
    assert paths == [f"images/frame_{i:05d}.png" for i in range(6)]
    assert meta["test_filenames"] == meta["val_filenames"] == [f"images/{n}" for n in TEST_NAMES]
    assert sorted(meta["train_filenames"] + meta["test_filenames"]) == paths
    for frame in meta["frames"]:
        image = Image.open(scene / frame["file_path"])
        assert (image.mode, image.size) == ("RGB", (48, 48))
        gt = Image.open(scene / "gt_instances" / Path(frame["file_path"]).name)
        assert gt.mode == "I;16" and gt.size == (48, 48)
        assert (scene / "sam_masks" / f"{Path(frame['file_path']).stem}.npy").is_file()
    info = _json(scene / "scene.json")
    assert info["seed"] == 3 and info["generator_version"] >= 1
    assert info["test_views"] == [0, 3] and info["train_views"] == [1, 2, 4, 5]
    assert [o["id"] for o in info["objects"]] == [1, 2, 3, 4]
    for obj in info["objects"]:
        assert obj["shape"] in {"box", "sphere", "cylinder", "cone", "torus"}
        assert len(obj["color"]) == 3 and all(0 <= c <= 255 for c in obj["color"])
        assert np.all(np.array(obj["bbox_min"]) < np.array(obj["bbox_max"]))
        assert obj["bbox_min"][2] == pytest.approx(0.0)  # resting on the ground


def test_cameras_are_opengl_look_at(scene: Path) -> None:
    for frame in _json(scene / "transforms.json")["frames"]:
        c2w = np.array(frame["transform_matrix"])  # [4, 4]
        rot, eye = c2w[:3, :3], c2w[:3, 3]
        np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-9)
        assert np.linalg.det(rot) == pytest.approx(1.0) and np.allclose(c2w[3], [0, 0, 0, 1])
        to_centre = -eye / np.linalg.norm(eye)
        assert -rot[:, 2] @ to_centre > 0.98  # looks down -Z at the scene centre
        assert rot[2, 1] > 0.0 and eye[2] > 0.0  # +Y roughly up, camera above the ground


def test_deterministic_per_seed(scene: Path, tmp_path: Path) -> None:
    again = generate_scene(tmp_path / "again", SPEC)
    assert _digest(again) == _digest(scene)
    other = generate_scene(tmp_path / "other", SceneSpec(**{**SPEC.__dict__, "seed": 4}))
    digest, reference = _digest(other), _digest(scene)
    assert digest.keys() == reference.keys()
    assert all(digest[f"images/{n}"] != reference[f"images/{n}"] for n in _names(scene))


def test_gt_ids_in_range_and_every_object_visible(scene: Path) -> None:
    info = _json(scene / "scene.json")
    seen = {obj["id"]: [] for obj in info["objects"]}
    for view, name in enumerate(_names(scene)):
        ids = np.unique(_gt(scene, name))
        assert ids.min() >= 0 and ids.max() <= SPEC.num_objects and 0 in ids
        for i in ids[ids > 0]:
            seen[int(i)].append(view)
    assert all(seen.values())
    assert seen == {obj["id"]: obj["visible_views"] for obj in info["objects"]}


def test_gt_inside_projected_bboxes_and_matches_object_hue(scene: Path) -> None:
    meta, info = _json(scene / "transforms.json"), _json(scene / "scene.json")
    hues = {o["id"]: colorsys.rgb_to_hsv(*(np.array(o["color"]) / 255.0))[0] for o in info["objects"]}
    for frame in meta["frames"]:
        name = Path(frame["file_path"]).name
        gt, rgb = _gt(scene, name), np.asarray(Image.open(scene / frame["file_path"])) / 255.0
        w2c = np.linalg.inv(np.array(frame["transform_matrix"]))
        for obj in info["objects"]:
            rows, cols = np.nonzero(gt == obj["id"])
            if len(rows) == 0:
                continue
            lo, hi = obj["bbox_min"], obj["bbox_max"]
            corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
            cam = corners @ w2c.T  # [8, 4], camera looks down -Z
            u = meta["fl_x"] * cam[:, 0] / -cam[:, 2] + meta["cx"]
            v = -meta["fl_y"] * cam[:, 1] / -cam[:, 2] + meta["cy"]
            assert u.min() - 1 <= cols.min() + 0.5 and cols.max() + 0.5 <= u.max() + 1
            assert v.min() - 1 <= rows.min() + 0.5 and rows.max() + 0.5 <= v.max() + 1
            if len(rows) >= 20:
                hue = colorsys.rgb_to_hsv(*rgb[rows, cols].mean(axis=0))[0]
                distance = {k: min(abs(hue - h), 1 - abs(hue - h)) for k, h in hues.items()}
                assert min(distance, key=distance.get) == obj["id"]


def test_point_cloud_on_visible_surfaces(scene: Path) -> None:
    import open3d as o3d  # the reader nerfstudio's dataparser uses

    pcd = o3d.io.read_point_cloud(str(scene / "sparse_pc.ply"))
    xyz, colours = np.asarray(pcd.points), np.asarray(pcd.colors)  # [P, 3], [P, 3] in [0, 1]
    assert xyz.shape == colours.shape == (SPEC.num_points, 3)
    assert colours.std(axis=0).min() > 0.02  # not a constant colour
    layout = layout_scene(SPEC, make_cameras(SPEC))
    _, distance, faces = layout.mesh.nearest.on_surface(xyz)
    assert distance.max() < 1e-4
    on_objects = layout.face_instance[faces] > 0
    assert 0.02 < on_objects.mean() < 0.98  # both ground and objects are represented


def test_nerfstudio_dataparser_loads_split_and_points(scene: Path) -> None:
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    parser = NerfstudioDataParserConfig(data=scene, load_3D_points=True).setup()
    train, test = parser.get_dataparser_outputs("train"), parser.get_dataparser_outputs("test")
    assert len(train.image_filenames) == 4 and train.cameras.shape == (4,)
    assert [p.name for p in test.image_filenames] == TEST_NAMES and test.cameras.shape == (2,)
    assert not set(train.image_filenames) & set(test.image_filenames)
    assert int(train.cameras.width[0]) == int(train.cameras.height[0]) == 48
    import open3d as o3d

    ours = torch.from_numpy(np.asarray(o3d.io.read_point_cloud(str(scene / "sparse_pc.ply")).points)).float()
    homogeneous = torch.cat([ours, torch.ones_like(ours[:, :1])], 1)  # [P, 4]
    expected = (homogeneous @ train.dataparser_transform.T) * train.dataparser_scale
    torch.testing.assert_close(train.metadata["points3D_xyz"], expected)
    assert train.cameras.camera_to_worlds[:, :3, 3].abs().max() <= 1.0 + 1e-5  # auto-scaled poses


def test_saved_sam_masks_are_object_aligned_but_not_gt(scene: Path) -> None:
    differs = []
    for name in _names(scene):
        gt = _gt(scene, name)
        masks = np.load(scene / "sam_masks" / f"{Path(name).stem}.npy")
        assert masks.dtype == bool and masks.ndim == 3 and masks.shape[1:] == gt.shape
        regions = [gt == i for i in np.unique(gt)]
        differs.append({m.tobytes() for m in masks} != {r.tobytes() for r in regions})
        for m in masks:
            contributors = [r for r in regions if (m & r).sum() >= 0.1 * m.sum()]
            support = ndimage.binary_dilation(np.logical_or.reduce(contributors), iterations=2)
            assert (m & ~support).sum() <= 0.1 * m.sum()
    assert any(differs)


@pytest.mark.parametrize("use_points", [False, True])
def test_sam_masks_merge_and_split_exactly_without_jitter(scene: Path, use_points: bool) -> None:
    cameras = make_cameras(SPEC)
    layout = layout_scene(SPEC, cameras)
    merged = split = False
    for view, name in enumerate(_names(scene)):
        gt = _gt(scene, name)
        points = render_view(layout, cameras, view, 1).points if use_points else None
        rng = np.random.default_rng(view)
        masks = make_sam_like_masks(gt, rng, points=points, p_merge=0.9, p_split=0.9, p_jitter=0.0, p_drop_small=0.0)
        for m in masks:
            ids = np.unique(gt[m])
            whole = np.isin(gt, ids)
            if len(ids) == 2 and 0 not in ids:
                assert (m == whole).all()  # a merge is the exact union of two objects
                merged = True
            else:
                assert len(ids) == 1  # otherwise a single object or part of it, or a ground region
                split |= ids[0] != 0 and not (m == whole).all()
    assert merged and split


def test_sam_masks_jitter_stays_within_band() -> None:
    gt = np.zeros((40, 40), dtype=np.int64)
    gt[5:20, 5:20], gt[10:30, 22:35] = 1, 2
    masks = make_sam_like_masks(
        gt, np.random.default_rng(0), p_merge=0.0, p_split=0.0, p_jitter=1.0, max_jitter_px=2, p_ground=0.0
    )
    assert masks.shape == (2, 40, 40)
    assert any((m != (gt == 1)).any() and (m != (gt == 2)).any() for m in masks)
    for m in masks:
        region = gt == np.bincount(gt[m]).argmax()
        assert (ndimage.binary_erosion(region, iterations=2) <= m).all()
        assert (m <= ndimage.binary_dilation(region, iterations=2)).all()


def test_sam_masks_empty_view_and_determinism() -> None:
    empty = make_sam_like_masks(np.zeros((16, 16), dtype=np.uint16), np.random.default_rng(0), p_ground=0.0)
    assert empty.shape == (0, 16, 16) and empty.dtype == bool
    gt = np.zeros((32, 32), dtype=np.uint16)
    gt[4:12, 4:12], gt[12:20, 4:14], gt[22:30, 20:30] = 1, 2, 3
    first = make_sam_like_masks(gt, np.random.default_rng(7))
    np.testing.assert_array_equal(first, make_sam_like_masks(gt, np.random.default_rng(7)))
    outputs = {make_sam_like_masks(gt, np.random.default_rng(s)).tobytes() for s in range(8)}
    assert len(outputs) > 1
    with pytest.raises(ValueError, match="p_merge"):
        make_sam_like_masks(gt, np.random.default_rng(0), p_merge=1.5)


@pytest.mark.parametrize(
    ("flag", "value"), [("--objects", "0"), ("--views", "1"), ("--size", "0"), ("--size", "-5"), ("--test-every", "1")]
)
def test_cli_rejects_bad_values(tmp_path: Path, capsys: pytest.CaptureFixture, flag: str, value: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "s"), flag, value])
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_library_rejects_bad_spec(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_views"):
        generate_scene(tmp_path / "s", SceneSpec(num_views=1))


def test_cli_output_directory_rules(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    small = ["--out", str(out), "--views", "3", "--size", "16", "--points", "50"]
    with pytest.raises(SystemExit):
        main(small)
    assert "--overwrite" in capsys.readouterr().err and not (out / "images").exists()
    main(small + ["--overwrite"])
    assert (out / "notes.txt").read_text() == "keep me" and len(list((out / "images").iterdir())) == 3
    main(["--out", str(out), "--views", "2", "--size", "16", "--points", "50"])  # a previous scene: replaced
    assert sorted(p.name for p in (out / "images").iterdir()) == ["frame_00000.png", "frame_00001.png"]
    assert _json(out / "scene.json")["spec"]["num_views"] == 2


# ---- objects cast alone (amodal ground truth) ------------------------------------------------------


def _amodal(scene: Path, object_id: int, name: str) -> np.ndarray:
    return np.asarray(Image.open(scene / "gt_amodal" / str(object_id) / name)) > 127


def test_amodal_masks_for_every_object_on_the_test_views_only(scene: Path) -> None:
    info = _json(scene / "scene.json")
    assert info["gt_amodal_dir"] == "gt_amodal"
    hidden_somewhere = False
    for obj in info["objects"]:
        folder = scene / "gt_amodal" / str(obj["id"])
        assert sorted(p.name for p in folder.iterdir()) == TEST_NAMES  # test views only: what eval needs
        in_frame = []
        for view, name in zip(info["test_views"], TEST_NAMES):
            alone, visible = _amodal(scene, obj["id"], name), _gt(scene, name) == obj["id"]
            assert (visible <= alone).all()  # the visible part lies inside the object cast alone
            hidden_somewhere |= bool((alone & ~visible).any())
            if alone.any():
                in_frame.append(view)
        assert obj["in_frame_test_views"] == in_frame
    assert hidden_somewhere  # other objects (or itself) hide parts the amodal masks keep


def test_amodal_mask_is_the_object_with_everything_else_removed(scene: Path) -> None:
    cameras = make_cameras(SPEC)
    layout = layout_scene(SPEC, cameras)
    from trace3d_ns.scene.generate import SceneLayout

    for k, obj in enumerate(layout.objects):
        alone_layout = SceneLayout([obj], layout.ground, layout.light_dir)
        for view, name in zip(SPEC.test_indices(), TEST_NAMES):
            ids = render_view(alone_layout, cameras, view, 1).instances  # ground kept: it never covers objects
            np.testing.assert_array_equal(_amodal(scene, obj.instance_id, name), ids == obj.instance_id)


# ---- cluttered layouts ---------------------------------------------------------------------------------

CLUTTER = SceneSpec(num_objects=8, num_views=6, image_size=48, seed=3, test_every=3, num_points=600,
                    sam_like_masks=True, clutter=True)


@pytest.fixture(scope="module")
def clutter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_scene(tmp_path_factory.mktemp("clutter") / "scene", CLUTTER)


def _mesh_distance(a, b, samples: int = 4000) -> float:
    """Smallest distance from points sampled on mesh a to mesh b."""
    import trimesh

    points = trimesh.sample.sample_surface(a, samples, seed=0)[0]
    return float(trimesh.proximity.closest_point(b, points)[1].min())


def test_clutter_roles_contacts_and_no_interpenetration(clutter: Path) -> None:
    from trace3d_ns.scene.clutter import role_counts

    info = _json(clutter / "scene.json")
    layout = layout_scene(CLUTTER, make_cameras(CLUTTER))
    objects = {o.instance_id: o for o in layout.objects}
    roles = [o["role"] for o in info["objects"]]
    assert {r: roles.count(r) for r in set(roles)} == {k: v for k, v in role_counts(8).items() if v}
    assert {o["shape"] for o in info["objects"] if o["role"] == "thin"} == {"table", "lamp"}
    placed_against = {c["object"] for c in info["contacts"]}
    assert placed_against == set(objects) - {1}  # every object but the first was placed against another
    for c in info["contacts"]:
        a, b = objects[c["object"]], objects[c["against"]]
        if c["kind"] == "stack":
            assert a.mesh.bounds[0, 2] == pytest.approx(b.mesh.bounds[1, 2], abs=1e-9)  # on the top
        if c["kind"] == "stack" or c["kind"] == "lean" or {a.shape, b.shape} == {"box"}:
            assert _mesh_distance(a.mesh, b.mesh) < 3e-3  # touching (the layout leaves a 1 mm gap)
        if c["kind"] == "lean":
            assert a.mesh.bounds[0, 2] == pytest.approx(0.0, abs=1e-9) and a.mesh.bounds[1, 2] < b.mesh.bounds[1, 2]
    for a in layout.objects:  # vertices pulled 1% towards their own centre lie outside every other object
        pulled = a.mesh.vertices + 0.01 * (a.mesh.vertices.mean(axis=0) - a.mesh.vertices)
        for b in layout.objects:
            if b is not a:
                assert not b.mesh.contains(pulled).any(), (a.instance_id, b.instance_id)


def test_clutter_has_thin_parts_and_shared_textures(clutter: Path) -> None:
    info = _json(clutter / "scene.json")
    thin = {o["shape"]: o for o in info["objects"] if o["role"] == "thin"}
    assert thin["table"]["num_parts"] == 5 and thin["table"]["params"]["leg_radius"] <= 0.022
    assert thin["lamp"]["num_parts"] == 3 and thin["lamp"]["params"]["pole_radius"] <= 0.02
    assert info["shared_textures"]  # the first eligible contact always shares
    by_id = {o["id"]: o for o in info["objects"]}
    contacts = {(c["object"], c["against"]) for c in info["contacts"]}
    for a, b in info["shared_textures"]:
        assert (a, b) in contacts
        assert by_id[a]["color"] == by_id[b]["color"] and by_id[a]["pattern"] == by_id[b]["pattern"]
    layout = layout_scene(CLUTTER, make_cameras(CLUTTER))
    a, b = (next(o for o in layout.objects if o.instance_id == i) for i in info["shared_textures"][0])
    points = np.random.default_rng(0).uniform(-1, 1, (50, 3))
    np.testing.assert_array_equal(a.albedo(points), b.albedo(points))  # one pattern in one frame


def test_clutter_is_deterministic_and_differs_from_the_sparse_layout(clutter: Path, tmp_path: Path) -> None:
    again = generate_scene(tmp_path / "again", CLUTTER)
    assert _digest(again) == _digest(clutter)
    sparse = layout_scene(SceneSpec(**{**CLUTTER.__dict__, "clutter": False}), make_cameras(CLUTTER))
    assert all(o.role == "ground" for o in sparse.objects)


def test_sam_like_masks_split_objects_into_their_parts() -> None:
    gt = np.zeros((20, 20), dtype=np.int64)
    gt[2:18, 2:8] = 1
    parts = np.zeros((20, 20), dtype=np.int64)
    parts[10:18, 2:8] = 1  # object 1 has a top part 0 and a bottom part 1
    masks = make_sam_like_masks(gt, np.random.default_rng(0), parts=parts, p_split=1.0, p_keep_whole=0.0,
                                p_jitter=0.0, p_ground=0.0, p_drop_small=0.0)
    assert sorted(m.tobytes() for m in masks) == sorted([((gt == 1) & (parts == k)).tobytes() for k in (0, 1)])


def test_sam_like_masks_merge_biased_pairs() -> None:
    gt = np.zeros((20, 30), dtype=np.int64)
    gt[5:15, 2:10], gt[5:15, 10:18], gt[5:15, 18:26] = 1, 2, 3  # a row of three touching objects
    kw = dict(p_merge=0.0, p_split=0.0, p_jitter=0.0, p_ground=0.0, p_drop_small=0.0)
    for seed in range(5):
        masks = make_sam_like_masks(gt, np.random.default_rng(seed), merge_bias={(2, 3): 1.0}, **kw)
        assert sorted(m.tobytes() for m in masks) == sorted([(gt == 1).tobytes(), np.isin(gt, [2, 3]).tobytes()])
    plain = make_sam_like_masks(gt, np.random.default_rng(0), **kw)
    assert len(plain) == 3


def test_cli_clutter_flag(tmp_path: Path) -> None:
    main(["--out", str(tmp_path / "c"), "--clutter", "--objects", "5", "--views", "3", "--size", "24", "--points", "50"])
    info = _json(tmp_path / "c" / "scene.json")
    assert info["spec"]["clutter"] is True and info["contacts"]
