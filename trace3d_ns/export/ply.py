"""Vectorized binary PLY for 3D Gaussian splats, in the layout of nerfstudio 1.1.5 `ns-export gaussian-splat`.

One `vertex` element, binary little-endian, float32 properties in this order::

    x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 f_rest_0 .. f_rest_{3K-1} opacity scale_0..2 rot_0..3

- `f_dc_*` are SH DC coefficients. A model with SH degree 0 (K = 0, splatfacto then stores colour
  logits in `features_dc`) is written as ns-export does, with f_dc = (sigmoid(features_dc) - 0.5) / C0.
- `nx ny nz` are zeros; `f_rest` is channel-major (all K coefficients of red, then green, then
  blue); `opacity` is the raw logit and `scale_*` the raw log scales; `rot_*` is the quaternion
  as stored (w, x, y, z). Without higher SH bands (K = 0) there are no `f_rest` properties.
- Like ns-export, rows with a NaN/Inf in any float property, or with an opacity logit below its
  hard-coded `logit(1/255)` (-5.5373, compared in float32), are dropped; inputs are cast to
  float32 first. (ns-export itself tests the x, y, z columns over all rows at once, so one NaN
  position makes it drop every Gaussian; here only that row is dropped.)
- Extra per-vertex properties (e.g. an int32 `instance`) may follow the splat properties.

The table is built as one float32 matrix and written as one numpy structured array with a single
`tofile`: about 1 s per million Gaussians (SH degree 3) where nerfstudio's per-vertex loop takes
70-120 s; the data bytes are identical (`trace3d_ns.benchmarks.export`).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]

PARAM_KEYS: Tuple[str, ...] = ("means", "scales", "quats", "features_dc", "features_rest", "opacities")
SH_C0 = 0.28209479177387814
MIN_OPACITY_LOGIT = np.float32(-5.5373)
"""ns-export's hard-coded logit(1/255); Gaussians below it are skipped by the CUDA rasterizer."""

_PLY_TYPE_BY_DTYPE: Dict[str, str] = {
    "i1": "char", "u1": "uchar", "i2": "short", "u2": "ushort",
    "i4": "int", "u4": "uint", "f4": "float", "f8": "double",
}  # fmt: skip
_DTYPE_BY_PLY_TYPE: Dict[str, str] = {
    **{ply: code for code, ply in _PLY_TYPE_BY_DTYPE.items()},
    "int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2",
    "int32": "i4", "uint32": "u4", "float32": "f4", "float64": "f8",
}  # fmt: skip


def splat_property_names(num_rest_coeffs: int) -> Tuple[str, ...]:
    """ns-export's property names for K = `num_rest_coeffs` higher SH coefficients per channel."""
    return (
        ("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2")
        + tuple(f"f_rest_{i}" for i in range(3 * num_rest_coeffs))
        + ("opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")
    )


def gaussian_arrays(source: Union[Mapping[str, ArrayLike], object]) -> Dict[str, np.ndarray]:
    """Splatfacto's Gaussian parameters as float32 numpy arrays, shapes checked.

    `source` is a mapping with the keys of `PARAM_KEYS` (tensors or arrays) or an object with such
    a mapping as `gauss_params` (a `SplatfactoModel`). Returned shapes: means, scales [N, 3],
    quats [N, 4], features_dc [N, 3], features_rest [N, K, 3], opacities [N].
    """
    params = getattr(source, "gauss_params", source)
    missing = [k for k in PARAM_KEYS if k not in params]
    if missing:
        raise ValueError(f"Gaussian parameters are missing {missing}")

    def as_f32(value: ArrayLike) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        return np.asarray(value, dtype=np.float32)

    out = {k: as_f32(params[k]) for k in PARAM_KEYS}
    out["opacities"] = out["opacities"].reshape(-1)
    n = out["means"].shape[0]
    expected = {"means": (n, 3), "scales": (n, 3), "quats": (n, 4), "features_dc": (n, 3), "opacities": (n,)}
    for key, shape in expected.items():
        if out[key].shape != shape:
            raise ValueError(f"{key} has shape {out[key].shape}, expected {shape}")
    rest = out["features_rest"]
    if rest.ndim != 3 or rest.shape[0] != n or rest.shape[2] != 3:
        raise ValueError(f"features_rest has shape {rest.shape}, expected ({n}, K, 3)")
    return out


@dataclass(frozen=True)
class SplatTable:
    """Gaussians as ns-export's PLY columns: `names` [F] and float32 `values` [N, F] in that order."""

    names: Tuple[str, ...]
    values: np.ndarray  # [N, F] float32, C-contiguous

    @classmethod
    def from_params(cls, source: Union[Mapping[str, ArrayLike], object]) -> "SplatTable":
        """All Gaussians of `source` (see `gaussian_arrays`), unfiltered."""
        p = gaussian_arrays(source)
        n, k = p["features_rest"].shape[:2]
        if k == 0:  # SH degree 0: logits -> SH DC, with ns-export's torch float32 arithmetic
            p["features_dc"] = ((torch.sigmoid(torch.from_numpy(p["features_dc"])) - 0.5) / SH_C0).numpy()
        rest = p["features_rest"].transpose(0, 2, 1).reshape(n, 3 * k)  # [N, 3K] channel-major
        normals = np.zeros((n, 3), np.float32)
        columns = [p["means"], normals, p["features_dc"], rest, p["opacities"][:, None], p["scales"], p["quats"]]
        values = np.concatenate(columns, axis=1)  # [N, F]
        return cls(splat_property_names(k), values)

    def __len__(self) -> int:
        return self.values.shape[0]

    def column(self, name: str) -> np.ndarray:
        """One property for all Gaussians. [N]"""
        return self.values[:, self.names.index(name)]

    def export_mask(self) -> np.ndarray:
        """Rows ns-export keeps: all values finite and opacity logit >= -5.5373. [N] bool"""
        finite = np.isfinite(self.values).all(axis=1)
        return finite & ~(self.column("opacity") < MIN_OPACITY_LOGIT)

    def subset(self, rows: np.ndarray) -> "SplatTable":
        """The Gaussians selected by a boolean mask [N] or an index array [M]."""
        return SplatTable(self.names, self.values[rows])

    def to_vertices(self, extra: Optional[Mapping[str, np.ndarray]] = None) -> np.ndarray:
        """One structured array [N] of little-endian fields: the splat columns, then `extra` ([N] each)."""
        extra = dict(extra or {})
        clash = set(extra) & set(self.names)
        if clash:
            raise ValueError(f"extra properties {sorted(clash)} clash with splat properties")
        for name, arr in extra.items():
            if arr.shape != (len(self),):
                raise ValueError(f"extra property {name!r} has shape {arr.shape}, expected ({len(self)},)")
        splat_fields = [(name, "<f4") for name in self.names]
        dtype = np.dtype(splat_fields + [(name, arr.dtype.newbyteorder("<")) for name, arr in extra.items()])
        vertices = np.empty(len(self), dtype=dtype)
        splat_bytes = np.ascontiguousarray(self.values, dtype="<f4").view(np.uint8)  # [N, 4F]
        vertices.view(np.uint8).reshape(len(self), dtype.itemsize)[:, : splat_bytes.shape[1]] = splat_bytes
        for name, arr in extra.items():
            vertices[name] = arr
        return vertices


def write_ply(path: Union[str, Path], vertices: np.ndarray, comments: Optional[Sequence[str]] = None) -> None:
    """Write a structured array [N] as the `vertex` element of a binary little-endian PLY (one write).

    `comments` default to a trace3d_ns origin line and ns-export's "Vertical Axis: z".
    """
    if comments is None:
        origin = f"Generated by trace3d_ns {version('trace3d-ns')} in the ns-export gaussian-splat layout"
        comments = (origin, "Vertical Axis: z")
    names = vertices.dtype.names
    if names is None:
        raise ValueError("vertices must be a structured array")
    lines = ["ply", "format binary_little_endian 1.0", *(f"comment {c}" for c in comments)]
    lines.append(f"element vertex {len(vertices)}")
    for name in names:
        field = vertices.dtype.fields[name][0]
        code = f"{field.kind}{field.itemsize}"
        if code not in _PLY_TYPE_BY_DTYPE or field.shape:
            raise ValueError(f"property {name!r} has dtype {field}, which PLY cannot hold")
        lines.append(f"property {_PLY_TYPE_BY_DTYPE[code]} {name}")
    lines.append("end_header")
    little = vertices.astype(vertices.dtype.newbyteorder("<"), copy=False)
    with open(path, "wb") as f:
        f.write(("\n".join(lines) + "\n").encode("ascii"))
        little.tofile(f)


def write_gaussian_ply(
    path: Union[str, Path],
    source: Union[Mapping[str, ArrayLike], object, SplatTable],
    extra: Optional[Mapping[str, np.ndarray]] = None,
) -> np.ndarray:
    """Write Gaussians as ns-export would (same filtering, same bytes), plus `extra` properties [N].

    Returns the boolean mask [N] of the Gaussians written.
    """
    table = source if isinstance(source, SplatTable) else SplatTable.from_params(source)
    keep = table.export_mask()
    kept_extra = {name: np.asarray(arr)[keep] for name, arr in (extra or {}).items()}
    write_ply(path, table.subset(keep).to_vertices(kept_extra))
    return keep


def read_ply(path: Union[str, Path]) -> Dict[str, np.ndarray]:
    """The `vertex` properties of a binary PLY with one element and scalar properties. name -> [N]

    The arrays are column views of one structured array read in a single `fromfile`.
    """
    byte_order, count, fields = None, None, []
    with open(path, "rb") as f:
        if f.readline().rstrip(b"\r\n") != b"ply":
            raise ValueError(f"{path} is not a PLY file")
        while True:
            line = f.readline()
            if not line:
                raise ValueError(f"{path}: header has no end_header")
            tokens = line.decode("ascii").split()
            if not tokens or tokens[0] in ("comment", "obj_info"):
                continue
            if tokens[0] == "end_header":
                break
            if tokens[0] == "format":
                orders = {"binary_little_endian": "<", "binary_big_endian": ">"}
                if tokens[1] not in orders:
                    raise ValueError(f"{path}: only binary PLY is supported, not {tokens[1]}")
                byte_order = orders[tokens[1]]
            elif tokens[0] == "element":
                if count is not None or tokens[1] != "vertex":
                    raise ValueError(f"{path}: only a single 'vertex' element is supported")
                count = int(tokens[2])
            elif tokens[0] == "property":
                if tokens[1] == "list" or tokens[1] not in _DTYPE_BY_PLY_TYPE:
                    raise ValueError(f"{path}: unsupported property {' '.join(tokens[1:])}")
                fields.append((tokens[2], _DTYPE_BY_PLY_TYPE[tokens[1]]))
        offset = f.tell()
    if byte_order is None or count is None:
        raise ValueError(f"{path}: header lacks a format or a vertex element")
    dtype = np.dtype([(name, byte_order + code) for name, code in fields])
    data = np.fromfile(path, dtype=dtype, count=count, offset=offset)
    if len(data) != count:
        raise ValueError(f"{path}: {len(data)} vertices in the file, header says {count}")
    return {name: data[name] for name in dtype.names}


def gaussian_params_from_ply(columns: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Splatfacto-shaped float32 arrays from `read_ply` columns (see `gaussian_arrays`).

    The inverse of the layout, except that `features_dc` are the file's SH DC coefficients: for a
    model with SH degree 0 they are not its colour logits (see the module docstring).
    """
    k = sum(name.startswith("f_rest_") for name in columns) // 3

    def stack(*names: str) -> np.ndarray:
        return np.stack([columns[n] for n in names], axis=1).astype(np.float32)

    n = len(columns["x"])
    rest = stack(*(f"f_rest_{i}" for i in range(3 * k))) if k else np.zeros((n, 0), np.float32)
    return {
        "means": stack("x", "y", "z"),
        "scales": stack("scale_0", "scale_1", "scale_2"),
        "quats": stack("rot_0", "rot_1", "rot_2", "rot_3"),
        "features_dc": stack("f_dc_0", "f_dc_1", "f_dc_2"),
        "features_rest": rest.reshape(n, 3, k).transpose(0, 2, 1),  # [N, K, 3]
        "opacities": np.asarray(columns["opacity"], dtype=np.float32),
    }
