"""Counting what is held: tensor memory allocated inside a block, and live objects of a kind.

`LiveTensorBytes` is a torch dispatch mode that follows every tensor storage created by an op
inside the block (views and in-place results of it included) and frees it when the last tensor
object referring to it is collected: `peak` is the largest total of such storage alive at once.
Tensors created before the block (inputs) are not counted.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage allocated inside the `with` block and still referenced."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: Dict[int, List[int]] = {}  # data_ptr -> [tensor objects alive, nbytes]

    def _release(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._storages[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if key == 0:
                continue
            if key in self._storages:
                self._storages[key][0] += 1
            elif key in inputs:
                continue  # an in-place op or a view of a tensor from before the block
            else:
                self._storages[key] = [1, nbytes]
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, key)
        return out


class LiveCounter:
    """Wraps a factory so that the objects it returns are counted while alive: `peak` is the most
    alive at once, `made` how many were made."""

    def __init__(self, factory: Callable[..., Any]) -> None:
        self.factory = factory
        self.alive = 0
        self.peak = 0
        self.made = 0

    def _gone(self) -> None:
        self.alive -= 1

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        obj = self.factory(*args, **kwargs)
        self.alive += 1
        self.made += 1
        self.peak = max(self.peak, self.alive)
        weakref.finalize(obj, self._gone)
        return obj
