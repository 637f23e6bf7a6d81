"""The backends held equal on one scene: renders, gradients, contributions and GIT sums.

The reference is gsplat on CUDA; every CPU backend of ``CPU_BACKENDS`` runs the same scene on the
CPU and is compared with it. Without CUDA the first CPU backend is the reference of the others
(with one CPU backend there is nothing to compare: the stage says so).

Per backend (``results``), on a seeded scene of random Gaussians with SH degree 3 and a 16-D
feature field, seen by two cameras:

- ``rasterize``: colour, expected depth (``RGB+ED``; compared times alpha, as accumulated depth,
  which stays smooth where alpha is tiny), alpha; gradients of a fixed random weighting of them with
  respect to means, quats, scales, opacities, SH, and the screen-space means2d and its absgrad
  (what densification reads);
- ``rasterize_with_extra`` with ``extra_grad_to_geometry``: the features' render and the gradients
  of a loss on colour and features with respect to means2d, means and the features;
- ``contributions`` per camera, and the GIT sums of a grid patch map (per Gaussian and patch, the
  alpha * T it draws there: ``TraceAccumulator`` on the CPU).

``compare`` turns two backends' results into errors with tolerances (float32 GPU kernels against
CPU code, and pairs near the 1/255 alpha and 1e-4 transmittance cut-offs may flip: a flipped pair
moves a pixel by at most about 1/255).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

CPU_BACKENDS: List[str] = ["torch", "compiled"]
"""CPU backends compared with gsplat (without CUDA, the first is the reference of the others)."""

SH_DEGREE, FEATURE_DIM = 3, 16


@dataclass
class Size:
    """Scene size: image width and height, number of Gaussians."""

    width: int = 160
    height: int = 120
    gaussians: int = 3000


SMALL = Size(64, 48, 400)
"""The CPU check's scene (nothing to compare with one CPU backend: the stage's code runs, quickly)."""
TOLERANCES = {
    "render_max": 2e-2,  # a few flipped pairs at the cut-offs
    "render_mean": 2e-4,
    "grad_rel": 2e-2,  # relative L2 error of a gradient
    "pairs_mismatch": 2e-3,  # share of pairs found by one backend only
    "weights_max": 2e-3,  # alpha * T of the pairs both found
    "git_rel": 1e-2,  # relative L1 error of the GIT sums
}


@dataclass
class Backend:
    """The three entry points of one backend, on its device."""

    name: str
    device: torch.device
    rasterize: Callable
    rasterize_with_extra: Callable
    contributions: Callable


def backend(name: str) -> Backend:
    """``"gsplat"`` (CUDA) or a name of ``CPU_BACKENDS``: `trace3d_ns.rendering`'s entry points
    pinned to that backend."""
    from trace3d_ns import rendering

    if name != "gsplat" and name not in CPU_BACKENDS:
        raise ValueError(f"unknown backend {name!r}; CPU backends: {CPU_BACKENDS}")
    device = torch.device("cuda" if name == "gsplat" else "cpu")
    return Backend(
        name, device, partial(rendering.rasterize, backend=name),
        partial(rendering.rasterize_with_extra, backend=name), partial(rendering.contributions, backend=name),
    )


def scene(size: Size, seed: int = 0) -> Dict[str, Tensor]:
    """Random Gaussians in front of two cameras, SH colours, features, loss weights (CPU tensors)."""
    g = torch.Generator().manual_seed(seed)
    n, width, height = size.gaussians, size.width, size.height
    focal = 0.5 * width / math.tan(math.radians(30.0))
    K = torch.tensor([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])
    viewmats = torch.eye(4).repeat(2, 1, 1)
    viewmats[:, 2, 3] = 3.0  # cameras 3 units in front of the origin, one shifted right
    viewmats[1, 0, 3] = -0.4
    return {
        "means": (torch.rand(n, 3, generator=g) - 0.5) * 2.0,
        "quats": torch.randn(n, 4, generator=g),
        "scales": 0.02 + 0.1 * torch.rand(n, 3, generator=g),
        "opacities": 0.05 + 0.9 * torch.rand(n, generator=g),
        "sh": 0.3 * torch.randn(n, (SH_DEGREE + 1) ** 2, 3, generator=g),
        "features": torch.randn(n, FEATURE_DIM, generator=g),
        "viewmats": viewmats,
        "Ks": K.expand(2, 3, 3).clone(),
        "w_render": torch.rand(2, height, width, 4, generator=g),
        "w_alpha": torch.rand(2, height, width, 1, generator=g),
        "w_extra": torch.rand(2, height, width, FEATURE_DIM, generator=g),
    }


def grid_patches(size: Size, grid: int = 6) -> Tensor:
    """A grid x grid patch map of the image (patch 0: the top-left cell). [H, W] int32"""
    rows = torch.arange(size.height) * grid // size.height
    cols = torch.arange(size.width) * grid // size.width
    return (rows[:, None] * grid + cols[None, :]).int()


def results(b: Backend, s: Dict[str, Tensor], size: Size) -> Dict[str, Tensor]:
    """Everything ``compare`` compares, as CPU tensors."""
    from trace3d_ns.git.tracing import TraceAccumulator, TraceConfig

    dev = {k: v.to(b.device) for k, v in s.items()}
    W, H = size.width, size.height
    out: Dict[str, Tensor] = {}
    leaves = {k: dev[k].clone().requires_grad_(True) for k in ("means", "quats", "scales", "opacities", "sh")}
    render, alpha, meta = b.rasterize(
        leaves["means"], leaves["quats"], leaves["scales"], leaves["opacities"], leaves["sh"], dev["viewmats"],
        dev["Ks"], W, H, sh_degree=SH_DEGREE, render_mode="RGB+ED", packed=False, absgrad=True,
    )
    meta["means2d"].retain_grad()
    depth = render[..., 3:] * alpha  # expected depth x alpha = accumulated depth: smooth where alpha is tiny
    w = dev["w_render"]
    ((render[..., :3] * w[..., :3]).sum() + (depth * w[..., 3:]).sum() + (alpha * dev["w_alpha"]).sum()).backward()
    out.update(render=render[..., :3].detach(), depth=depth.detach(), alpha=alpha.detach(),
               means2d_grad=meta["means2d"].grad, means2d_absgrad=meta["means2d"].absgrad)
    out.update({f"{k}_grad": v.grad for k, v in leaves.items()})

    leaves = {k: dev[k].clone().requires_grad_(True) for k in ("means", "quats", "scales", "opacities", "sh", "features")}
    render, alpha, meta, extra = b.rasterize_with_extra(
        leaves["means"], leaves["quats"], leaves["scales"], leaves["opacities"], leaves["sh"], dev["viewmats"],
        dev["Ks"], W, H, extra_colors=leaves["features"], extra_grad_to_geometry=True, sh_degree=SH_DEGREE,
        packed=False,
    )
    meta["means2d"].retain_grad()
    ((render * dev["w_render"][..., :3]).sum() + (extra * dev["w_extra"]).sum()).backward()
    out.update(extra=extra.detach(), feature_means2d_grad=meta["means2d"].grad, feature_means_grad=leaves["means"].grad,
               features_grad=leaves["features"].grad)

    acc = TraceAccumulator(size.gaussians, 2, TraceConfig(topk=64, min_prob=0.0, min_weight=0.0))
    for c in range(2):
        pairs = b.contributions(
            dev["means"], dev["quats"], dev["scales"], dev["opacities"], dev["viewmats"][c], dev["Ks"][c], W, H
        )
        out[f"pairs{c}"] = torch.stack([pairs.gaussian_ids.cpu(), pairs.pixel_ids.cpu()])
        out[f"weights{c}"] = pairs.weights.cpu()
        acc.add_view(c, type(pairs)(*(t.cpu() for t in (pairs.gaussian_ids, pairs.pixel_ids, pairs.weights)),
                                    W, H), grid_patches(size))
    store = acc.build()
    out["git_sums"] = torch.stack([store.view_dense(c) * store.weights(c)[:, None] for c in range(2)])
    return {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in out.items() if v is not None}


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _pair_agreement(ref: Dict[str, Tensor], other: Dict[str, Tensor], c: int, span: int) -> Dict[str, float]:
    """Share of pairs only one backend lists, and the largest weight difference of the common ones."""
    keys_a = ref[f"pairs{c}"][0] * span + ref[f"pairs{c}"][1]
    keys_b = other[f"pairs{c}"][0] * span + other[f"pairs{c}"][1]
    sorted_b, order_b = torch.sort(keys_b)
    pos = torch.searchsorted(sorted_b, keys_a).clamp(max=max(len(sorted_b) - 1, 0))
    found = sorted_b[pos] == keys_a if len(sorted_b) else torch.zeros_like(keys_a, dtype=torch.bool)
    common = int(found.sum())
    mismatch = (len(keys_a) - common + len(keys_b) - common) / max(len(keys_a), 1)
    diff = (ref[f"weights{c}"][found] - other[f"weights{c}"][order_b[pos[found]]]).abs()
    return {"pairs": len(keys_a), "pairs_mismatch": mismatch, "weights_max": float(diff.max()) if common else 0.0}


def compare(ref: Dict[str, Tensor], other: Dict[str, Tensor]) -> Dict[str, object]:
    """Errors of ``other`` against ``ref`` and whether each is within ``TOLERANCES``; ``ok`` overall."""
    t = TOLERANCES
    render_err = (ref["render"] - other["render"]).abs()
    alpha_err = (ref["alpha"] - other["alpha"]).abs()
    extra_err = (ref["extra"] - other["extra"]).abs()
    depth_scale = float(ref["depth"].abs().max().clamp(min=1.0))
    errors: Dict[str, float] = {
        "render_max": float(render_err.max()),
        "render_mean": float(render_err.mean()),
        "alpha_max": float(alpha_err.max()),
        "depth_max": float((ref["depth"] - other["depth"]).abs().max()) / depth_scale,
        "extra_max": float(extra_err.max()),
    }
    checks = {
        "render": errors["render_max"] <= t["render_max"] and errors["render_mean"] <= t["render_mean"],
        "alpha": errors["alpha_max"] <= t["render_max"],
        "depth": errors["depth_max"] <= t["render_max"],  # relative to the largest accumulated depth
        "extra": errors["extra_max"] <= t["render_max"] * 10,  # features are N(0, 1), not in [0, 1]
    }
    for name in ("means_grad", "quats_grad", "scales_grad", "opacities_grad", "sh_grad", "means2d_grad",
                 "means2d_absgrad", "feature_means2d_grad", "feature_means_grad", "features_grad"):
        if name in ref and name in other:
            errors[name] = _rel(other[name], ref[name])
            checks[name] = errors[name] <= t["grad_rel"]
        else:
            checks[name] = name not in ref and name not in other
    for c in range(2):
        pairs = _pair_agreement(ref, other, c, span=ref["render"].shape[1] * ref["render"].shape[2])
        errors.update({f"cam{c}_{k}": v for k, v in pairs.items()})
        checks[f"cam{c}_pairs"] = pairs["pairs_mismatch"] <= t["pairs_mismatch"] and pairs["weights_max"] <= t["weights_max"]
    errors["git_rel"] = float((ref["git_sums"] - other["git_sums"]).abs().sum() / ref["git_sums"].abs().sum().clamp(min=1e-12))
    checks["git_sums"] = errors["git_rel"] <= t["git_rel"]
    return {"ok": all(checks.values()), "failed": sorted(k for k, v in checks.items() if not v), "errors": errors}


def run(cuda: bool, cpu_backends: Optional[List[str]] = None, small: bool = False) -> Dict[str, object]:
    """The backends stage: gsplat against each CPU backend (with CUDA), else the CPU backends
    against the first of them; ``small``: the ``SMALL`` scene."""
    names = list(cpu_backends or CPU_BACKENDS)
    size = SMALL if small else Size()
    s = scene(size)
    out: Dict[str, object] = {"cpu_backends": names, "tolerances": TOLERANCES, "scene": vars(size)}
    computed = {name: results(backend(name), s, size) for name in names}
    finite = {name: all(torch.isfinite(v).all() for v in r.values() if v.is_floating_point()) for name, r in computed.items()}
    out["finite"] = finite
    if cuda:
        reference = "gsplat"
        ref = results(backend("gsplat"), s, size)
    else:
        reference = names[0]
        ref = computed[reference]
        out["skipped"] = (
            f"no CUDA device: the gsplat comparison is skipped; the CPU backends are compared with {reference}"
            if len(names) > 1 else "no CUDA device: the gsplat comparison is skipped (one CPU backend, nothing to compare)"
        )
    out["reference"] = reference
    comparisons = {name: compare(ref, r) for name, r in computed.items() if name != reference}
    out["comparisons"] = comparisons
    out["ok"] = all(finite.values()) and all(c["ok"] for c in comparisons.values())
    return out
