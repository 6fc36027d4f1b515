"""What a run allocates, measured on the meta device (no memory, no GPU).

`LiveBytes` is a dispatch mode that follows every tensor storage created while it is active and
records the live total after each operation (and its peak): what a CUDA caching allocator would
have to hold, before its own rounding and fragmentation. `CudaKernels` makes the meta run allocate
like the CUDA kernels the model uses on a GPU rather than like the CPU/meta decompositions:

- scaled-dot-product attention as a flash-style kernel (output + log-sum-exp, never the S×S
  score matrix the math fallback would build);
- RMSNorm as the fused CUDA kernel (`_fused_rms_norm`: output + per-row rstd, no float32 copies).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any = None) -> Any:
    return args[index] if index < len(args) else kwargs.get(name, default)


class CudaKernels(TorchFunctionMode):
    """On meta tensors, allocate like the CUDA kernels (see the module docstring)."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query, key, value = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
            mask = _arg(args, kwargs, 3, "attn_mask")
            if query.device.type == "meta" and mask is None:
                causal = bool(_arg(args, kwargs, 5, "is_causal", False))
                scale = kwargs.get("scale")
                return torch.ops.aten._scaled_dot_product_flash_attention(
                    query, key, value, is_causal=causal, scale=scale
                )[0]
        if func is F.rms_norm:
            x, shape = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "normalized_shape")
            weight = _arg(args, kwargs, 2, "weight")
            if x.device.type == "meta" and (weight is None or weight.dtype == x.dtype):
                out = torch.empty_like(x)
                _rstd = x.new_empty(
                    (*x.shape[: x.ndim - len(shape)], *([1] * len(shape))), dtype=torch.float32
                )
                return out
        return func(*args, **kwargs)


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage alive, after every operation run under this mode.

    Storages that existed before (weights: pass them to `ignore`) are not counted; a storage is
    counted from the operation that creates it until Python frees its last tensor."""

    def __init__(self, ignore: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.timeline: list[int] = []  # live bytes after each operation
        self._seen: dict[int, weakref.ref[Any]] = {}
        for tensor in ignore:
            storage = tensor.untyped_storage()
            self._seen[id(storage)] = weakref.ref(storage)

    def reset_peak(self) -> None:
        self.peak = self.live

    def _releaser(self, key: int, nbytes: int) -> Callable[[Any], None]:
        def release(_ref: Any) -> None:
            self.live -= nbytes
            self._seen.pop(key, None)

        return release

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in self._seen:
                continue
            nbytes = storage.nbytes()
            self.live += nbytes
            self._seen[key] = weakref.ref(storage, self._releaser(key, nbytes))
        self.peak = max(self.peak, self.live)
        self.timeline.append(self.live)
        return out


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers at their current dtypes (shared tensors once)."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())
