#!/usr/bin/env python
"""Screenshot a trained Trace3D run in nerfstudio's viewer, as a user would see it.

Starts `ns-viewer --load-config ... --viewer.websocket-port PORT` (on the CPU when there is no
GPU), opens the page in headless Chromium through playwright-core from npm (the system Chromium is
used; `npx playwright install` is not needed), moves the camera with the mouse (wheel zoom-out,
right-drag pan, left-drag tilt), picks an entry of the "Output type" dropdown, optionally selects
an object by clicking (the "Select object (click)" button, then a point of the 3D view), waits
for the CPU render to settle and saves a PNG of the page.

The `instance` output needs instance labels in the checkpoint: run `trace3d-trace --load-config
...` first. The viewer outputs come from the model's `get_outputs_for_camera` (see docs/VIEWER.md).

Example (the demo scene of docs/VIEWER.md)::

    npm install --prefix /tmp/vw_tools playwright-core
    python scripts/viewer_screenshot.py --load-config outputs/.../config.yml \\
        --node-modules /tmp/vw_tools/node_modules --zoom-out 4 --pan-up 250 --tilt 120 \\
        --output instance --out docs/viewer_instance.png
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
  if (opt.click) {
    await choose("Select by", opt.selectBy);
    await page.getByRole("button", { name: "Select object (click)" }).click();
    // armed once "Selected" says so: GUI callbacks wait for the frame being rendered
    const status = page.locator('xpath=//label[normalize-space()="Selected"]/../../..//input');  // no id to label
    while ((await status.inputValue()) !== opt.armed) await page.waitForTimeout(500);
    await page.mouse.click(box.x + opt.click[0] * box.width, box.y + opt.click[1] * box.height);
  }
  await choose("Output type", opt.output);
  await page.waitForTimeout(opt.settleMs);
  await page.screenshot({ path: opt.out });
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


def screenshot(args: argparse.Namespace) -> None:
    """Runs ns-viewer on `args.load_config`, drives the page in Chromium and saves `args.out`."""
    ns_viewer = Path(sys.executable).with_name("ns-viewer")
    cmd = [str(ns_viewer), "--load-config", str(args.load_config), "--viewer.websocket-port", str(args.port)]
    viewer = subprocess.Popen(cmd)
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
                "click": args.click, "selectBy": args.select_by, "armed": ARMED,
            }  # fmt: skip
            env = {**os.environ, "NODE_PATH": str(args.node_modules)}
            subprocess.run(["node", str(script), json.dumps(options)], env=env, check=True)
    finally:
        viewer.terminate()
        viewer.wait(timeout=30)
    print(f"saved {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load-config", type=Path, required=True, help="config.yml of a trained trace3d run")
    parser.add_argument("--out", type=Path, default=Path("docs/viewer_instance.png"), help="PNG to write")
    parser.add_argument("--output", default="instance", help="entry of the viewer's Output type dropdown")
    parser.add_argument("--port", type=int, default=7007, help="viewer websocket port")
    parser.add_argument("--node-modules", type=Path, required=True, help="node_modules holding playwright-core")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable")
    parser.add_argument("--settle", type=float, default=90.0, help="seconds to let the CPU render settle")
    parser.add_argument("--zoom-out", type=int, default=0, metavar="N", help="mouse-wheel steps away from the scene")
    parser.add_argument("--pan-up", type=int, default=0, metavar="PX", help="right-drag upwards by PX (pan)")
    parser.add_argument("--tilt", type=int, default=0, metavar="PX", help="left-drag downwards by PX (orbit)")
    parser.add_argument("--click", type=float, nargs=2, metavar=("X", "Y"),
                        help="press 'Select object (click)', then click here (fractions of the 3D view)")  # fmt: skip
    parser.add_argument("--select-by", default="auto", choices=["auto", "feature", "instance"],
                        help="the 'Select by' mode for --click")  # fmt: skip
    screenshot(parser.parse_args())


if __name__ == "__main__":
    main()
