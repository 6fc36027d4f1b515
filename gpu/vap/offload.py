"""Keep a module's weights in host memory and lend them to the GPU only while it runs.

The text and image encoders (UMT5-XXL 11.4 GB, CLIP 2.5 GB) run once per video, before the
denoising loop that needs the GPU memory most. Their weights never change, so the host copy is the
only one kept: lending copies it to the device (pinned memory: fast, asynchronous), returning just
drops the device copy — nothing is copied back.

Pinned memory costs more than the weights: PyTorch's CUDA caching host allocator rounds every
pinned request up to the next power of two (`CachingHostAllocatorImpl::allocate`:
`c10::llvm::PowerOf2Ceil(size)`; `torch.cuda.memory.host_memory_stats` documents it), and each
tensor is pinned on its own, so UMT5-XXL's 11.4 GB take 15.0 GB. `pinned_nbytes` says what a
module really pins; the container's memory request is sized from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn


def host_block_nbytes(nbytes: int) -> int:
    """The pinned block the caching host allocator reserves for a request of `nbytes`."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


def _unique_tensors(module: nn.Module) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for tensor in table.values():
                if tensor is not None:
                    seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def pinned_nbytes(module: nn.Module) -> int:
    """Host memory `HostResident(module)` pins (each tensor its own power-of-two block); works on
    the meta device, so a deployment can size its containers without loading anything."""
    return sum(host_block_nbytes(t.numel() * t.element_size()) for t in _unique_tensors(module))


class HostResident:
    """`module`'s parameters and buffers live in host memory; `on(device)` lends them to `device`.

    The host tensors stay the module's own: lending swaps device copies into the module (one per
    shared tensor, so tied weights stay tied) and returning swaps the originals back."""

    def __init__(self, module: nn.Module, pin: bool | None = None) -> None:
        self.module = module.to("cpu")
        pin = torch.cuda.is_available() if pin is None else pin
        # (owning submodule, attribute name, is parameter, original host tensor)
        self._slots: list[tuple[nn.Module, str, bool, torch.Tensor]] = []
        pinned: dict[int, torch.Tensor] = {}
        for sub in self.module.modules():
            for table, is_param in ((sub._parameters, True), (sub._buffers, False)):
                for name, tensor in table.items():
                    if tensor is None:
                        continue
                    if pin and id(tensor) not in pinned:
                        pinned[id(tensor)] = tensor
                        tensor.data = tensor.data.pin_memory()
                    self._slots.append((sub, name, is_param, tensor))

    @property
    def nbytes(self) -> int:
        unique = {id(t): t for *_, t in self._slots}
        return sum(t.numel() * t.element_size() for t in unique.values())

    @property
    def pinned_nbytes(self) -> int:
        """Host memory this module's pinned copies take (0 when not pinned)."""
        unique = {id(t): t for *_, t in self._slots}
        return sum(host_block_nbytes(t.numel() * t.element_size()) for t in unique.values() if t.is_pinned())

    def _lend(self, device: torch.device) -> None:
        copies: dict[int, torch.Tensor] = {}
        for sub, name, is_param, host in self._slots:
            copy = copies.get(id(host))
            if copy is None:
                data = host.detach().to(device, non_blocking=True)
                copy = nn.Parameter(data, requires_grad=False) if is_param else data
                copies[id(host)] = copy
            self._set(sub, name, is_param, copy)

    def _return(self) -> None:
        for sub, name, is_param, host in self._slots:
            self._set(sub, name, is_param, host)

    @staticmethod
    def _set(sub: nn.Module, name: str, is_param: bool, tensor: torch.Tensor) -> None:
        if is_param:
            assert isinstance(tensor, nn.Parameter)
            sub._parameters[name] = tensor
        else:
            sub._buffers[name] = tensor

    @contextmanager
    def on(self, device: torch.device | str) -> Iterator[nn.Module]:
        """The module on `device` for the duration of the block; only host copies remain after."""
        device = torch.device(device)
        if device.type == "cpu":
            yield self.module
            return
        self._lend(device)
        try:
            yield self.module
        finally:
            self._return()
