"""Rank 0 hands each transformer call's arguments to the other ranks.

A call's arguments are split into a small picklable header (structure, shapes, dtypes, plain
values) that travels over a `multiprocessing` pipe, and its tensors, which travel by
`torch.distributed.broadcast` from rank 0 (NCCL on GPUs: device to device). An argument that is
the same object as in the previous call (the text/image context, the reference stream: constant
over a video) is sent as "cached" and reused by the receivers, so a denoising step moves only
the latents and the timestep.

Two details keep every rank's forward identical to rank 0's:
- a tensor that is a broadcast view along some dimensions (stride 0: the pipeline's CFG rows
  `latents.expand(2, ...)`) travels as one slice and is expanded again on arrival, so the
  receivers see the same strides (the transformer computes such rows once);
- a dataclass travels by its init fields only: fields set later (`init=False`, e.g.
  `ReferenceContext.first_expert_qkv`, which holds the sender's own token slice) are per-process
  state, rebuilt by each receiver.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

_CACHED = ("cached",)


def _encode(value: Any, tensors: list[torch.Tensor]) -> tuple[Any, ...]:
    if isinstance(value, torch.Tensor):
        # Broadcast dimensions (stride 0, size > 1) travel as size 1: (sent shape, full shape).
        sent = value[tuple(slice(0, 1) if st == 0 and n > 1 else slice(None)
                           for st, n in zip(value.stride(), value.shape, strict=True))]  # fmt: skip
        tensors.append(sent)
        return ("tensor", tuple(sent.shape), value.dtype, tuple(value.shape))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {
            f.name: _encode(getattr(value, f.name), tensors) for f in dataclasses.fields(value) if f.init
        }
        return ("dataclass", type(value), fields)
    if isinstance(value, tuple | list):
        return (type(value).__name__, [_encode(v, tensors) for v in value])
    if isinstance(value, dict):
        if not all(isinstance(k, int | str) for k in value):
            raise TypeError("cannot send a dict with keys other than int/str to the other ranks")
        return ("dict", {k: _encode(v, tensors) for k, v in value.items()})
    if value is None or isinstance(value, bool | int | float | str | torch.dtype):
        return ("value", value)
    raise TypeError(f"cannot send a {type(value).__name__} to the other ranks")


def _decode(node: tuple[Any, ...], tensors: list[torch.Tensor]) -> Any:
    kind = node[0]
    if kind == "tensor":
        tensor = tensors.pop(0)
        return tensor if tuple(tensor.shape) == node[3] else tensor.expand(node[3])
    if kind == "dataclass":
        return node[1](**{name: _decode(sub, tensors) for name, sub in node[2].items()})
    if kind in ("tuple", "list"):
        items = [_decode(sub, tensors) for sub in node[1]]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict":
        return {k: _decode(sub, tensors) for k, sub in node[1].items()}
    return node[1]


def _tensor_specs(node: tuple[Any, ...]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    kind = node[0]
    if kind == "tensor":
        return [(node[1], node[2])]
    if kind == "dataclass":
        return [spec for sub in node[2].values() for spec in _tensor_specs(sub)]
    if kind in ("tuple", "list"):
        return [spec for sub in node[1] for spec in _tensor_specs(sub)]
    if kind == "dict":
        return [spec for sub in node[1].values() for spec in _tensor_specs(sub)]
    return []


def _reference_to(value: Any) -> Callable[[], Any]:
    try:
        return weakref.ref(value)
    except TypeError:  # tuples: small (rotary tables of views), held strongly
        return lambda: value


class CallSender:
    """Rank 0: turns named arguments into a header and broadcasts their tensors."""

    def __init__(self) -> None:
        # Weak references where the type allows: the cache must not keep the reference stream and
        # the context (GBs at 720p) alive once the pipeline drops them for the VAE decode. A dead
        # reference answers None, so a reused id can't pass for the cached object.
        self._last: dict[str, Callable[[], Any]] = {}

    def header(self, arguments: dict[str, Any]) -> tuple[dict[str, tuple[Any, ...]], list[torch.Tensor]]:
        header: dict[str, tuple[Any, ...]] = {}
        tensors: list[torch.Tensor] = []
        for name, value in arguments.items():
            if isinstance(value, torch.Tensor | tuple) or dataclasses.is_dataclass(value):
                cached = self._last.get(name)
                if cached is not None and cached() is value:
                    header[name] = _CACHED
                    continue
                self._last[name] = _reference_to(value)
            header[name] = _encode(value, tensors)
        return header, tensors

    @staticmethod
    def broadcast(tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            dist.broadcast(tensor.contiguous(), src=0)

    def reset(self) -> None:
        self._last.clear()


class CallReceiver:
    """Other ranks: rebuild the arguments of rank 0's call from its header and broadcasts."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._last: dict[str, Any] = {}

    def receive(self, header: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
        arguments: dict[str, Any] = {}
        for name, node in header.items():
            if node == _CACHED:
                arguments[name] = self._last[name]
                continue
            tensors = [
                torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in _tensor_specs(node)
            ]
            for tensor in tensors:
                dist.broadcast(tensor, src=0)
            arguments[name] = _decode(node, tensors)
            if node[0] != "value":
                self._last[name] = arguments[name]
        return arguments

    def reset(self) -> None:
        self._last.clear()
