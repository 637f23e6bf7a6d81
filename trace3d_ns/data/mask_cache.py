"""On-disk cache of per-image integer maps (patch maps, later consistent instance maps).

One cache entry is one ``.npz`` bundle holding the maps of all training images in order, stored
under ``<root>/<kind>-<key>.npz`` where

- ``kind`` names what the maps are (``"patches"``, ``"consistent"``, ...), and
- ``key`` = :meth:`MapCache.make_key` of (kind, ordered image names, one content stamp per image,
  the settings that produced the maps). Any change to an image, its order, or a setting gives a new
  key, i.e. a miss and a recompute.

Every bundle stores its key, the image names, each map's shape and a checksum of the payload;
:meth:`MapCache.load_maps` verifies all of them, so a truncated, partial or otherwise corrupted file
is detected (a warning, the file is removed, and the caller recomputes). Writes go to a temporary
file in the same directory and are published with ``os.replace``, so readers never see half files.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

CACHE_DIRNAME = ".trace3d_cache"
"""Name of the cache folder created beside the data."""
FORMAT_VERSION = 1
"""Bumped whenever the bundle layout changes (old bundles then simply miss)."""


class CacheWarning(UserWarning):
    """A cache file was unreadable or inconsistent and is being recomputed."""


def stable_hash(obj: Any, digest_size: int = 16) -> str:
    """Hex digest of a JSON-able object, independent of dict order and of the Python process."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=digest_size).hexdigest()


def default_cache_dir(data_path: Path) -> Path:
    """``<data dir>/.trace3d_cache`` (``data_path`` may be the data directory or a file in it)."""
    data_path = Path(data_path)
    base = data_path.parent if data_path.is_file() else data_path
    return base / CACHE_DIRNAME


def user_cache_dir(data_path: Path) -> Path:
    """Fallback location for read-only data: ``$XDG_CACHE_HOME/trace3d_ns/<hash of the data dir>``."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trace3d_ns"
    return root / stable_hash(str(Path(data_path).resolve()), digest_size=8)


def _is_writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
        return True
    except OSError:
        return False


def _payload_checksum(data: np.ndarray, shapes: np.ndarray, names: Sequence[str], key: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(key.encode())
    h.update("\0".join(names).encode())
    h.update(np.ascontiguousarray(shapes, dtype=np.int64).tobytes())
    h.update(str(data.dtype).encode())
    h.update(memoryview(np.ascontiguousarray(data)).cast("B"))
    return h.hexdigest()


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _compact_dtype(lo: int, hi: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


class MapCache:
    """A folder of cached map bundles.

    Args:
        root: the cache folder (created on first write).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def beside_data(cls, data_path: Path, cache_dir: Optional[Path] = None) -> "MapCache":
        """The cache for a scene: ``cache_dir`` if given, else ``<data dir>/.trace3d_cache``, or a
        per-user folder if the data directory is read-only."""
        if cache_dir is not None:
            return cls(Path(cache_dir))
        preferred = default_cache_dir(data_path)
        if _is_writable_dir(preferred):
            return cls(preferred)
        fallback = user_cache_dir(data_path)
        warnings.warn(f"{preferred.parent} is not writable; caching masks in {fallback}", CacheWarning, stacklevel=2)
        return cls(fallback)

    @staticmethod
    def make_key(kind: str, names: Sequence[str], stamps: Sequence[str], settings: Mapping[str, Any]) -> str:
        """Key of the maps of ``kind`` for these images (ordered names and content stamps) and settings."""
        if len(names) != len(stamps):
            raise ValueError(f"{len(names)} names but {len(stamps)} stamps")
        return stable_hash(
            {"v": FORMAT_VERSION, "kind": kind, "names": list(names), "stamps": list(stamps), "settings": settings},
            digest_size=20,
        )

    def path(self, kind: str, key: str) -> Path:
        """File of the bundle ``(kind, key)``."""
        return self.root / f"{kind}-{key}.npz"

    def has(self, kind: str, key: str) -> bool:
        return self.path(kind, key).is_file()

    # ----------------------------------------------------------------------------------------

    def save_maps(
        self,
        kind: str,
        key: str,
        names: Sequence[str],
        maps: Sequence[np.ndarray],
        meta: Optional[Mapping[str, Any]] = None,
    ) -> Path:
        """Atomically write the maps (each [H, W] integer, any shapes) of ``names`` under (kind, key).

        Returns:
            The bundle's path.
        """
        if len(names) != len(maps):
            raise ValueError(f"{len(names)} names but {len(maps)} maps")
        arrays = [np.asarray(m) for m in maps]
        for name, m in zip(names, arrays):
            if m.ndim != 2 or not np.issubdtype(m.dtype, np.integer):
                raise ValueError(f"Map of {name!r} must be a 2-D integer array, got {m.dtype} {m.shape}")
        shapes = np.array([m.shape for m in arrays], dtype=np.int64).reshape(len(arrays), 2)  # [N, 2]
        lo = min((int(m.min()) for m in arrays if m.size), default=0)
        hi = max((int(m.max()) for m in arrays if m.size), default=0)
        dtype = _compact_dtype(lo, hi)
        data = (
            np.concatenate([m.reshape(-1) for m in arrays]).astype(dtype)
            if arrays
            else np.zeros(0, dtype=dtype)
        )
        names = [str(n) for n in names]
        checksum = _payload_checksum(data, shapes, names, key)
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(kind, key)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{final.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    format=np.array(FORMAT_VERSION),
                    kind=np.array(kind),
                    key=np.array(key),
                    names=np.array(names, dtype=str),
                    shapes=shapes,
                    data=data,
                    checksum=np.array(checksum),
                    meta=np.array(json.dumps(dict(meta or {}), sort_keys=True, default=str)),
                )
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600; use normal permissions
            os.replace(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return final

    def load_maps(
        self,
        kind: str,
        key: str,
        names: Optional[Sequence[str]] = None,
        shapes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> Optional[List[np.ndarray]]:
        """Load the bundle (kind, key) as int32 maps, or None on a miss.

        A bundle that cannot be read, fails its checksum, or does not match ``names`` / ``shapes``
        (when given) is reported with a :class:`CacheWarning`, deleted, and treated as a miss.
        """
        path = self.path(kind, key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                fmt = int(z["format"])
                stored_key = str(z["key"])
                stored_names = [str(n) for n in z["names"]]
                stored_shapes = np.asarray(z["shapes"], dtype=np.int64).reshape(-1, 2)
                data = z["data"]
                checksum = str(z["checksum"])
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
            return self._discard(path, f"unreadable ({type(err).__name__}: {err})")
        if fmt != FORMAT_VERSION or stored_key != key:
            return self._discard(path, "written for a different key or format")
        if _payload_checksum(data, stored_shapes, stored_names, stored_key) != checksum:
            return self._discard(path, "checksum mismatch")
        sizes = stored_shapes[:, 0] * stored_shapes[:, 1]
        if int(sizes.sum()) != data.size:
            return self._discard(path, "payload size does not match the stored shapes")
        if names is not None and list(names) != stored_names:
            return self._discard(path, "image names differ")
        if shapes is not None and [tuple(s) for s in stored_shapes.tolist()] != [tuple(s) for s in shapes]:
            return self._discard(path, "map shapes differ from the images")
        flat = data.astype(np.int32, copy=False)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        return [flat[offsets[i] : offsets[i + 1]].reshape(stored_shapes[i]) for i in range(len(stored_names))]

    def load_meta(self, kind: str, key: str) -> Optional[dict]:
        """The ``meta`` dict saved with a bundle (None if absent or unreadable)."""
        try:
            with np.load(self.path(kind, key), allow_pickle=False) as z:
                return json.loads(str(z["meta"]))
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error):
            return None

    def _discard(self, path: Path, why: str) -> None:
        warnings.warn(f"Cache file {path} is {why}; recomputing it.", CacheWarning, stacklevel=3)
        try:
            path.unlink()
        except OSError:
            pass
        return None

    # ----------------------------------------------------------------------------------------

    def get_or_compute(
        self,
        kind: str,
        key: str,
        names: Sequence[str],
        compute: Callable[[int], np.ndarray],
        shapes: Optional[Sequence[Tuple[int, int]]] = None,
        description: Optional[str] = None,
        meta: Optional[Mapping[str, Any]] = None,
    ) -> Tuple[List[np.ndarray], bool]:
        """Load (kind, key) or compute every map with ``compute(i)`` (with a progress bar) and save.

        Returns:
            (maps as int32 arrays, whether it was a cache hit)
        """
        cached = self.load_maps(kind, key, names=names, shapes=shapes)
        if cached is not None:
            return cached, True
        maps = compute_maps(len(names), compute, description or f"Computing {kind} maps")
        self.save_maps(kind, key, names, maps, meta=meta)
        return maps, False


def compute_maps(n: int, compute: Callable[[int], np.ndarray], description: str) -> List[np.ndarray]:
    """``[compute(i) for i in range(n)]`` as int32 arrays, behind a rich progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    out: List[np.ndarray] = []
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=n)
        for i in range(n):
            out.append(np.asarray(compute(i)).astype(np.int32, copy=False))
            progress.advance(task)
    return out
