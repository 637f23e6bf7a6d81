"""What a user does, stage by stage, each run in-process through the same entry point as its command.

A ``Check`` holds the settings and the paths stages share (the generated scene, the trained run's
config.yml). ``STAGES`` lists the stages in order; each returns a dict of details (raising on
failure) and runs only when the stages it needs succeeded.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple


@dataclass
class Check:
    """Settings of one run and what stages hand on."""

    device: str  # "cuda" or "cpu"
    steps: int
    work: Path
    views: int
    size: int
    scene: Optional[Path] = None
    config: Optional[Path] = None
    prompt_point: Optional[Tuple[int, int]] = None
    notes: List[str] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()


def environment(check: Check) -> Dict:
    """Versions, the device, and on CUDA gsplat's kernels (built on first use: timed here)."""
    import gsplat
    import torch

    from trace3d_ns.device import require_gsplat_cuda

    out = {"torch": torch.__version__, "gsplat": gsplat.__version__, "cuda_available": torch.cuda.is_available()}
    if not check.cuda:
        torch.set_num_threads(1)  # what the model does on the CPU (cpu_threads): small work, one thread
    out["threads"] = torch.get_num_threads()
    if check.cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda, but torch sees no CUDA GPU (run with --device cpu for the CPU check)")
        out["gpu"] = torch.cuda.get_device_name(0)
        out["torch_cuda"] = torch.version.cuda
        start = time.perf_counter()
        require_gsplat_cuda()
        out["gsplat_kernels_s"] = time.perf_counter() - start  # includes the one-time nvcc build
    return out


def backends(check: Check) -> Dict:
    from trace3d_ns.gpu_check.backends import run

    result = run(cuda=check.cuda, small=not check.cuda)
    if not result["ok"]:
        failed = {k: v["failed"] for k, v in result["comparisons"].items() if not v["ok"]}
        raise _StageFailed(f"backends disagree: {failed}; finite: {result['finite']}", result)
    return result


def scene(check: Check) -> Dict:
    """trace3d-scene: a generated scene with SAM-like (inconsistent) masks and ground truth."""
    from trace3d_ns.scene.generate import SceneSpec, generate_scene

    spec = SceneSpec(num_objects=3, num_views=check.views, image_size=check.size, num_points=1500, test_every=5,
                     sam_like_masks=True)
    check.scene = generate_scene(check.work / "scene", spec, overwrite=True)
    meta = json.loads((check.scene / "scene.json").read_text())
    check.prompt_point = _object_centre(check.scene, meta)
    return {"views": check.views, "size": check.size, "train_views": len(meta["train_views"])}


def _object_centre(scene_dir: Path, meta: Dict) -> Tuple[int, int]:
    """The deepest pixel of the largest object in the first training view (for trace3d-prompt)."""
    import numpy as np
    from PIL import Image

    from trace3d_ns.evaluation.harness import prompt_points

    name = meta["file_names"][meta["train_views"][0]]
    gt = np.asarray(Image.open(scene_dir / meta["gt_instances_dir"] / name))
    largest = np.bincount(gt[gt > 0]).argmax()
    (p,) = prompt_points(gt == largest, 1)
    return p.x, p.y


def schedule(steps: int) -> List[str]:
    """ns-train arguments that fit GIT, density control and features into `steps` steps."""
    third, half, sixth = max(steps // 3, 1), max(steps // 2, 2), max(steps // 6, 1)
    return [
        "--max-num-iterations", str(steps), "--steps-per-save", str(steps),
        "--steps-per-eval-image", "0", "--steps-per-eval-all-images", "0",
        "--pipeline.model.num-downscales", "0",
        "--pipeline.model.warmup-length", str(sixth), "--pipeline.model.refine-every", str(max(steps // 10, 1)),
        "--pipeline.model.stop-split-at", str(half),
        "--pipeline.git-step", str(third), "--pipeline.model.feature-start-step", str(third),
        "--pipeline.density.start-step", str(half), "--pipeline.density.every", str(sixth),
        "--pipeline.density.cycles", "2",
    ]  # fmt: skip


def train(check: Check) -> Dict:
    """ns-train trace3d (GIT, density control, features) on the scene. On the CPU no device is
    given, so the `auto` device's fallback (one warning) is exercised; on CUDA it is explicit."""
    import warnings

    import tyro

    from nerfstudio.configs.method_configs import AnnotatedBaseConfigUnion
    from nerfstudio.scripts import train as ns_train
    from trace3d_ns.device import DeviceFallbackWarning

    args = [
        "trace3d", "--data", str(check.scene), "--output-dir", str(check.work / "outputs"),
        "--experiment-name", "check", "--timestamp", "run", "--vis", "tensorboard",
        "--pipeline.datamanager.mask-source", "folder", "--pipeline.datamanager.folder.directory", "sam_masks",
        *schedule(check.steps),
    ]  # fmt: skip
    if check.cuda:
        args += ["--machine.device-type", "cuda"]
    config = tyro.cli(AnnotatedBaseConfigUnion, args=args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeviceFallbackWarning)
        ns_train.main(config)
    fallback = [w for w in caught if issubclass(w.category, DeviceFallbackWarning)]
    check.config = check.work / "outputs" / "check" / "trace3d" / "run" / "config.yml"
    density = check.config.parent / "density_control.json"
    cycles = json.loads(density.read_text()) if density.is_file() else []
    ckpts = sorted((check.config.parent / "nerfstudio_models").glob("step-*.ckpt"))
    if not ckpts or len(cycles) != 2:
        raise RuntimeError(f"training left {len(ckpts)} checkpoints and {len(cycles)} density cycles (expected 2)")
    return {
        "steps": check.steps, "device": config.machine.device_type, "fallback_warnings": len(fallback),
        "gaussians": cycles[-1]["num_after"], "density_cycles": len(cycles), "config": str(check.config),
    }


def trace(check: Check) -> Dict:
    from trace3d_ns.trace_cli import main

    _expect_zero(main(["--load-config", str(check.config)]), "trace3d-trace")
    return {}


def prompt(check: Check) -> Dict:
    from trace3d_ns.prompt_cli import main

    x, y = check.prompt_point
    out = check.work / "prompt"
    _expect_zero(main(["--load-config", str(check.config), "--view", "0", "--points", f"{x},{y}", "--output-dir", str(out)]),
                 "trace3d-prompt")
    summary = json.loads((out / "prompt.json").read_text())
    if not 0 < summary["selected_gaussians"] < summary["total_gaussians"]:
        raise RuntimeError(f"trace3d-prompt selected {summary['selected_gaussians']} of {summary['total_gaussians']}")
    return {"selected": summary["selected_gaussians"], "visited_views": len(summary["visited_views"])}


def export(check: Check) -> Dict:
    from trace3d_ns.export.cli import main

    out = check.work / "export"
    _expect_zero(main(["--load-config", str(check.config), "--output-dir", str(out)]), "trace3d-export")
    index = json.loads((out / "instances.json").read_text())
    return {"instances": len(index["instances"])}


def evaluate(check: Check) -> Dict:
    from trace3d_ns.evaluation.cli import main

    out = check.work / "eval.json"
    _expect_zero(main(["--load-config", str(check.config), "--gt", str(check.scene), "--out", str(out)]), "trace3d-eval")
    result = json.loads(out.read_text())
    return {"foreground_miou": result["foreground"]["miou"], "novel_view_miou": result["novel_view_segmentation"]["miou"]}


def ns_export(check: Check) -> Dict:
    """ns-export gaussian-splat (nerfstudio's exporter on a trace3d checkpoint)."""
    import tyro

    from nerfstudio.scripts.exporter import Commands

    out = check.work / "ns_export"
    tyro.cli(Commands, args=["gaussian-splat", "--load-config", str(check.config), "--output-dir", str(out)]).main()
    ply = out / "splat.ply"
    if not ply.is_file() or ply.stat().st_size == 0:
        raise RuntimeError(f"ns-export wrote no {ply}")
    return {"bytes": ply.stat().st_size}


def viewer(check: Check) -> Dict:
    """ns-viewer's set-up (server, scene), then one frame per output through the viewer's own
    camera and colormap code, with a click selection so that `selection` is among them."""
    import threading
    import urllib.request
    from types import SimpleNamespace

    import numpy as np
    import torch

    from nerfstudio.cameras.cameras import CameraType
    from nerfstudio.utils import colormaps
    from nerfstudio.utils.eval_utils import eval_setup
    from nerfstudio.viewer import utils as viewer_utils
    from nerfstudio.viewer.viewer import Viewer

    from nerfstudio.viewer_legacy.server.viewer_utils import get_free_port

    config, pipeline, _, step = eval_setup(check.config, test_mode="test")
    config.viewer.websocket_host = "127.0.0.1"
    config.viewer.websocket_port = get_free_port(default_port=7107)
    start = time.perf_counter()
    state = Viewer(config.viewer, log_filename=check.work / "viewer_log.txt", datapath=pipeline.datamanager.get_datapath(),
                   pipeline=pipeline, train_lock=threading.Lock())
    try:
        state.init_scene(train_dataset=pipeline.datamanager.train_dataset, train_state="completed",
                         eval_dataset=pipeline.datamanager.eval_dataset)
        state.update_scene(step=step)
        with urllib.request.urlopen(f"http://127.0.0.1:{config.viewer.websocket_port}/", timeout=30) as page:
            status = page.status
        start_s = time.perf_counter() - start
        model, panel = pipeline.model, state.control_panel
        cams = pipeline.datamanager.train_dataset.cameras
        height, width = int(cams.height[0]), int(cams.width[0])
        fov = 2 * math.atan(0.5 * height / float(cams.fy[0]))
        camera_state = viewer_utils.CameraState(fov=fov, aspect=width / height, c2w=cams.camera_to_worlds[0],
                                                camera_type=CameraType.PERSPECTIVE)
        camera = viewer_utils.get_camera(camera_state, height, width).to(model.device)
        x, y = check.prompt_point
        model.viewer_controls.on_click(SimpleNamespace(screen_pos=((x + 0.5) / width, (y + 0.5) / height)), camera)
        keys = list(model.get_outputs_for_camera(camera))
        if keys[0] != "rgb":
            raise RuntimeError(f"the viewer would open on {keys[0]!r}, not 'rgb' (outputs: {keys})")
        panel.update_output_options(keys)
        frames = {}
        for key in keys:
            panel._output_render.value = key  # what choosing it in the dropdown sets
            start = time.perf_counter()
            with torch.no_grad():
                outputs = model.get_outputs_for_camera(camera)
            image = colormaps.apply_colormap(outputs[key], colormap_options=panel.colormap_options)
            frame = (image * 255).type(torch.uint8).cpu().numpy()
            check.sync()
            if frame.shape != (height, width, 3) or not np.isfinite(image.cpu().numpy()).all():
                raise RuntimeError(f"output {key!r} gave a frame of shape {frame.shape}")
            frames[key] = time.perf_counter() - start
    finally:
        state.viser_server.stop()
    missing = {"rgb", "feature_pca", "instance", "selection"} - set(keys)
    if missing:
        raise RuntimeError(f"viewer outputs lack {sorted(missing)} (outputs: {keys})")
    return {"http_status": status, "start_s": start_s, "outputs": keys, "frame_s": frames}


def git_over_forward(check: Check) -> Dict:
    """Time of one view's Gaussian Instance Tracing (contributions + scatter-add) over one forward
    render of the same view, on the trained model (median of 5)."""
    import statistics

    import torch

    from nerfstudio.utils.eval_utils import eval_setup
    from trace3d_ns.git.tracing import TraceAccumulator, view_contributions
    from trace3d_ns.rendering import rasterize

    _, pipeline, _, _ = eval_setup(check.config, test_mode="val")
    model, dm = pipeline.model, pipeline.datamanager
    cams, patch = dm.train_dataset.cameras, dm.train_patch_maps()[0].to(model.device)
    g = model.activated_gaussians()
    viewmat, K, width, height = model.camera_matrices(cams[0:1], as_given=True)
    if model.config.sh_degree > 0:
        colors, sh_degree = g["sh"], model.config.sh_degree
    else:
        colors, sh_degree = torch.sigmoid(g["sh"]).squeeze(1), None
    acc = TraceAccumulator(model.num_points, 1)

    def forward() -> None:
        with torch.no_grad():
            rasterize(g["means"], g["quats"], g["scales"], g["opacities"], colors, viewmat, K, width, height,
                      sh_degree=sh_degree, packed=False)

    def traced() -> None:
        acc.add_view(0, view_contributions(model, cams, 0, tuple(patch.shape), g), patch)

    def timed(fn: Callable[[], None]) -> float:
        fn()  # warm-up
        times = []
        for _ in range(5):
            check.sync()
            start = time.perf_counter()
            fn()
            check.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    forward_s, trace_s = timed(forward), timed(traced)
    return {"forward_s": forward_s, "trace_s": trace_s, "git_over_forward": trace_s / forward_s,
            "gaussians": model.num_points, "width": width, "height": height}


def _expect_zero(code: int, command: str) -> None:
    if code != 0:
        raise RuntimeError(f"{command} exited with {code}")


class _StageFailed(RuntimeError):
    """A stage failed with details worth keeping in the report."""

    def __init__(self, message: str, details: Dict) -> None:
        super().__init__(message)
        self.details = details


STAGES: List[Tuple[str, Callable[[Check], Dict], Tuple[str, ...]]] = [
    ("environment", environment, ()),
    ("backends", backends, ("environment",)),
    ("scene", scene, ("environment",)),
    ("train", train, ("environment", "scene")),
    ("trace", trace, ("train",)),
    ("prompt", prompt, ("train",)),
    ("export", export, ("trace",)),
    ("eval", evaluate, ("train",)),
    ("ns_export", ns_export, ("train",)),
    ("viewer", viewer, ("trace",)),
    ("git_over_forward", git_over_forward, ("train",)),
]
"""(name, function, names of the stages it needs)."""


def run_stages(check: Check, log: Callable[[str], None]) -> Dict[str, Dict]:
    """Runs every stage whose prerequisites succeeded; returns {name: {"ok", "seconds", ...}}."""
    import traceback

    report: Dict[str, Dict] = {}
    for name, fn, needs in STAGES:
        blocked = [n for n in needs if not report.get(n, {}).get("ok")]
        if blocked:
            report[name] = {"ok": False, "seconds": 0.0, "error": f"not run: needs {', '.join(blocked)}"}
            continue
        log(f"[gpu_check] stage {name}")
        start = time.perf_counter()
        try:
            details = fn(check)
            report[name] = {"ok": True, "seconds": time.perf_counter() - start, **details}
        except BaseException as err:  # noqa: BLE001 - a stage's failure is reported, the others still run
            if isinstance(err, KeyboardInterrupt):
                raise
            log(traceback.format_exc())
            report[name] = {"ok": False, "seconds": time.perf_counter() - start, "error": f"{type(err).__name__}: {err}"}
            if isinstance(err, _StageFailed):
                report[name].update(details=err.details)
        with contextlib.suppress(Exception):
            import torch

            if check.cuda:
                torch.cuda.empty_cache()
    return report
