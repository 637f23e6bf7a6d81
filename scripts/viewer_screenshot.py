#!/usr/bin/env python
"""Screenshot a trained Trace3D run in nerfstudio's viewer, as a user would see it.

Starts `ns-viewer --load-config ... --viewer.websocket-port PORT` (on the CPU when there is no
GPU), opens the page in headless Chromium through playwright-core from npm (`--chromium`: the
system Chromium, or the one the npm package `@sparticuz/chromium` ships; `npx playwright install`
is not needed), moves the camera with the mouse (wheel zoom-out, right-drag pan, left-drag tilt),
picks an entry of the "Output type" dropdown, optionally selects an object by clicking (the
"Select object (click)" button, then a point of the 3D view), waits for the CPU render to settle
and saves a PNG of the page.

`--train-view K` starts the viewer in this process instead (the same `RunViewer` as `ns-viewer`)
and puts the browser's camera on training camera K when it connects: the pose assignment that
clicking camera K's frustum in the viewer makes, plus the smallest vertical field of view that
shows all of training image K in the 3D view (whose aspect ratio differs from the image's).

The `instance` output needs instance labels in the checkpoint: run `trace3d-trace --load-config
...` first. The viewer outputs come from the model's `get_outputs_for_camera` (see docs/VIEWER.md).

Example (the demo scene of docs/VIEWER.md)::

    npm install --prefix /tmp/vw_tools playwright-core
    python scripts/viewer_screenshot.py --load-config outputs/.../config.yml \\
        --node-modules /tmp/vw_tools/node_modules --zoom-out 4 --pan-up 250 --tilt 120 \\
        --output instance --out docs/viewer_instance.png

Without a system Chromium, `npm install --prefix /tmp/vw_tools @sparticuz/chromium` brings one
inside the npm package (a Chromium build for AWS Lambda; 147.0.0 was used);
`NODE_PATH=/tmp/vw_tools/node_modules node -e 'require("@sparticuz/chromium").executablePath()
.then(console.log)'` unpacks it to /tmp/chromium (and prints that path); then pass
`--chromium /tmp/chromium`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from trace3d_ns.viewer_controls import ARMED

BROWSER_JS = r"""
const { chromium } = require("playwright-core");
const opt = JSON.parse(process.argv[2]);
(async () => {
  const context = await chromium.launchPersistentContext(opt.profile, {
    executablePath: opt.chromium,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    viewport: { width: 1280, height: 1000 },
  });
  const page = context.pages()[0] || (await context.newPage());
  await page.goto(opt.url);
  const dropdown = page.getByLabel("Output type", { exact: true });
  await dropdown.waitFor({ timeout: 120000 });
  // with --train-view --hide-train-cams: the scene (and the camera hook) is set up once this shows
  if (opt.sceneReady) await page.getByRole("button", { name: opt.sceneReady }).waitFor({ timeout: 120000 });
  const box = await page.locator("canvas").first().boundingBox();  // the 3D view, under the panel
  const [cx, cy] = [box.x + box.width / 2, box.y + box.height / 2];
  const drag = async (dy, button) => {
    await page.mouse.move(cx, cy);
    await page.mouse.down({ button });
    await page.mouse.move(cx, cy + dy, { steps: 10 });
    await page.mouse.up({ button });
  };
  await page.mouse.move(cx, cy);
  for (let i = 0; i < opt.zoomOut; i++) { await page.mouse.wheel(0, 200); await page.waitForTimeout(100); }
  if (opt.panUp) await drag(-opt.panUp, "right");
  if (opt.tilt) await drag(opt.tilt, "left");
  const choose = async (label, value) => {
    await page.getByLabel(label, { exact: true }).click();
    // the output options come from the first render, which may still be running on the CPU
    await page.getByRole("option", { name: value, exact: true }).click({ timeout: 600000 });
  };
  const status = page.locator('xpath=//label[normalize-space()="Selected"]/../../..//input');  // no id to label
  if (opt.click) {
    await choose("Select by", opt.selectBy);
    await page.getByRole("button", { name: "Select object (click)" }).click();
    // armed once "Selected" says so: GUI callbacks wait for the frame being rendered
    while ((await status.inputValue()) !== opt.armed) await page.waitForTimeout(500);
    await page.mouse.click(box.x + opt.click[0] * box.width, box.y + opt.click[1] * box.height);
    while ((await status.inputValue()) === opt.armed) await page.waitForTimeout(500);
  }
  await page.mouse.move(cx, cy);
  for (let i = 0; i < opt.zoomOutAfter; i++) { await page.mouse.wheel(0, 200); await page.waitForTimeout(100); }
  for (const [output, out] of [[opt.output, opt.out], ...opt.then]) {
    await choose("Output type", output);
    await page.mouse.move(0, 0);  // no tooltip in the picture
    await page.waitForTimeout(opt.settleMs);
    if (opt.click) {  // the panel scrolled to the selection controls and their readout
      await status.scrollIntoViewIfNeeded();
      console.log(`${output}: Selected = ${await status.inputValue()}`);
    }
    await page.screenshot({ path: out });
  }
  await context.close();
})().catch((err) => { console.error(err); process.exit(1); });
"""


def wait_for_http(url: str, viewer: subprocess.Popen, timeout: float) -> None:
    """Polls `url` until it answers; fails early if the viewer process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if viewer.poll() is not None:
            raise RuntimeError(f"ns-viewer exited with code {viewer.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def serve_from_train_view(load_config: Path, port: int, train_view: int, hide_train_cams: bool) -> None:
    """Runs ns-viewer's `RunViewer` here; each client's camera starts at training camera `train_view`.

    The pose is set as nerfstudio's frustum click sets it (position, then orientation) when the
    client connects (viser connects it on its first camera message, which the setters need); the
    vertical field of view becomes the smallest that holds the training camera's whole image in
    a view at least as wide as tall (not the client's reported aspect: the first camera message
    may come before the page's layout settles). `hide_train_cams` runs the two callbacks of the
    "Hide Train Cams" button once the frustums exist (pressing it earlier fails in nerfstudio).
    Never returns (the viewer serves until killed).
    """
    import numpy as np
    from nerfstudio.scripts.viewer.run_viewer import RunViewer, ViewerConfigWithoutNumRays
    from nerfstudio.viewer.viewer import Viewer

    init_scene = Viewer.init_scene

    def init_scene_then_hook(self: Viewer, train_dataset, *args, **kwargs) -> None:
        init_scene(self, train_dataset, *args, **kwargs)
        if train_view not in self.camera_handles:
            drawn = sorted(self.camera_handles)
            raise ValueError(f"--train-view {train_view}: the viewer draws training cameras {drawn}")
        frustum = self.camera_handles[train_view]
        camera = train_dataset.cameras[train_view]
        half_h = 0.5 * float(camera.height) / float(camera.fy)  # tan of half the vertical fov
        half_w = 0.5 * float(camera.width) / float(camera.fx)
        name = train_dataset._dataparser_outputs.image_filenames[train_view]

        def on_connect(client) -> None:  # viser calls it after the client's first camera message
            fov = float(2 * np.arctan(max(half_h, half_w)))
            print(f"client camera: training view {train_view} ({name}), vertical fov {np.degrees(fov):.1f} deg")
            with client.atomic():
                client.camera.position = frustum.position
                client.camera.wxyz = frustum.wxyz
                client.camera.fov = fov

        self.viser_server.on_client_connect(on_connect)  # also called for clients already connected
        if hide_train_cams:
            self.set_camera_visibility(False)
            self.toggle_cameravis_button()

    Viewer.init_scene = init_scene_then_hook
    RunViewer(load_config=load_config, viewer=ViewerConfigWithoutNumRays(websocket_port=port)).main()


def shrink(png: Path, width: int) -> None:
    """Rewrites `png` `width` pixels wide (aspect kept) with a 256-colour palette, to keep docs small."""
    from PIL import Image

    image = Image.open(png).convert("RGB")
    if image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)
    image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(png, optimize=True)


def screenshot(args: argparse.Namespace) -> None:
    """Runs ns-viewer on `args.load_config`, drives the page in Chromium and saves `args.out`."""
    if args.train_view is None:
        ns_viewer = Path(sys.executable).with_name("ns-viewer")
        cmd = [str(ns_viewer), "--load-config", str(args.load_config), "--viewer.websocket-port", str(args.port)]
    else:
        cmd = [sys.executable, __file__, "--serve-only", "--load-config", str(args.load_config),
               "--port", str(args.port), "--train-view", str(args.train_view)]  # fmt: skip
        cmd += ["--hide-train-cams"] if args.hide_train_cams else []
    # nerfstudio stops a render by raising IOChangeException from a trace function when the camera
    # moves; raised while torch.compile compiles splatfacto's get_viewmat (the first render, seconds
    # on the CPU) it arrives wrapped in dynamo's InternalTorchDynamoError, which the render thread
    # does not catch: the thread dies and the view never renders again. Eager get_viewmat avoids it.
    viewer = subprocess.Popen(cmd, env={**os.environ, "TORCHDYNAMO_DISABLE": "1"})
    try:
        url = f"http://localhost:{args.port}"
        wait_for_http(url, viewer, timeout=300)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "shot.js"
            script.write_text(BROWSER_JS)
            options = {
                "url": url, "out": str(args.out.resolve()), "output": args.output, "chromium": args.chromium,
                "profile": str(Path(tmp) / "profile"), "settleMs": int(args.settle * 1000),
                "zoomOut": args.zoom_out, "panUp": args.pan_up, "tilt": args.tilt,
                "zoomOutAfter": args.zoom_out_after,
                "click": args.click, "selectBy": args.select_by, "armed": ARMED,
                "sceneReady": "Show Train Cams" if args.hide_train_cams else None,
                "then": [[output, str(Path(out).resolve())] for output, out in args.then or []],
            }  # fmt: skip
            env = {**os.environ, "NODE_PATH": str(args.node_modules)}
            subprocess.run(["node", str(script), json.dumps(options)], env=env, check=True)
        if args.shrink_to:
            for out in [args.out, *(Path(out) for _, out in args.then or [])]:
                shrink(out, args.shrink_to)
    finally:
        viewer.terminate()
        viewer.wait(timeout=30)
    print("saved", args.out, *(out for _, out in args.then or []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load-config", type=Path, required=True, help="config.yml of a trained trace3d run")
    parser.add_argument("--out", type=Path, default=Path("docs/viewer_instance.png"), help="PNG to write")
    parser.add_argument("--output", default="instance", help="entry of the viewer's Output type dropdown")
    parser.add_argument("--port", type=int, default=7007, help="viewer websocket port")
    parser.add_argument("--node-modules", type=Path, help="node_modules holding playwright-core")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable")
    parser.add_argument("--settle", type=float, default=90.0, help="seconds to let the CPU render settle")
    parser.add_argument("--zoom-out", type=int, default=0, metavar="N", help="mouse-wheel steps away from the scene")
    parser.add_argument("--zoom-out-after", type=int, default=0, metavar="N",
                        help="mouse-wheel steps away from the scene after --click (which hits the view as framed)")
    parser.add_argument("--pan-up", type=int, default=0, metavar="PX", help="right-drag upwards by PX (pan)")
    parser.add_argument("--tilt", type=int, default=0, metavar="PX", help="left-drag downwards by PX (orbit)")
    parser.add_argument("--click", type=float, nargs=2, metavar=("X", "Y"),
                        help="press 'Select object (click)', then click here (fractions of the 3D view)")  # fmt: skip
    parser.add_argument("--select-by", default="auto", choices=["auto", "feature", "instance"],
                        help="the 'Select by' mode for --click")  # fmt: skip
    parser.add_argument("--then", nargs=2, action="append", metavar=("OUTPUT", "PNG"),
                        help="afterwards switch to OUTPUT (same view and selection) and save PNG; repeatable")
    parser.add_argument("--shrink-to", type=int, metavar="W",
                        help="rewrite the PNGs W pixels wide with a 256-colour palette")
    parser.add_argument("--train-view", type=int, metavar="K",
                        help="start the browser's camera at training camera K (index into the train split)")
    parser.add_argument("--hide-train-cams", action="store_true",
                        help="with --train-view: training camera frustums hidden (as 'Hide Train Cams' does)")
    parser.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)  # the --train-view viewer
    args = parser.parse_args()
    if args.hide_train_cams and args.train_view is None:
        parser.error("--hide-train-cams needs --train-view")
    if args.serve_only:
        serve_from_train_view(args.load_config, args.port, args.train_view, args.hide_train_cams)
    elif args.node_modules is None:
        parser.error("--node-modules is required")
    else:
        screenshot(args)


if __name__ == "__main__":
    main()
