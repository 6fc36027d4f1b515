"""Attention kernels for the VAP transformer: which one runs, and a probe that proves it works.

Every attention of the model (the joint main+reference self-attention, the plain blocks' self-
attention, both cross-attentions) goes through `local_attention`. Backends are diffusers'
dispatcher names (`native`, `_native_cudnn`, `_flash_3`, `_flash_3_hub`, `flash`, ...) plus
`flash_4`: FlashAttention 4 from the PyPI package `flash-attn-4` (`flash_attn.cute`, CuTe DSL
kernels JIT-compiled for Hopper and Blackwell), which diffusers only offers through the hub.

`choose_backend(device)` tries the fastest candidate first and keeps the first one that passes
`backend_works` (same result as the math kernel on this device); cuDNN SDPA is the Hopper
fallback, torch SDPA the last resort.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

FLASH_4 = "flash_4"
BACKEND_ENV = "VAP_ATTENTION_BACKEND"
# Import name of each optional kernel package (the backend is only a candidate when it imports).
OPTIONAL_MODULES: dict[str, str] = {
    "_flash_3": "flash_attn_interface",  # FlashAttention 3 built from source (hopper/)
    FLASH_4: "flash_attn.cute",  # pip install flash-attn-4
    "_flash_3_hub": "kernels",  # FA3 from the `kernels` hub cache (needs the kernel downloaded)
    "flash": "flash_attn.flash_attn_interface",  # FlashAttention 2 (flash-attn; not the FA4 namespace)
}

logger = logging.getLogger(__name__)
_flash_4_func: Callable[..., Any] | None = None


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is missing or half-installed
        return False


def _flash_4(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    global _flash_4_func
    if _flash_4_func is None:
        _flash_4_func = importlib.import_module("flash_attn.cute").flash_attn_func
    out = _flash_4_func(query, key, value, causal=False)
    return out[0] if isinstance(out, tuple) else out


def local_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: Any
) -> torch.Tensor:
    """Unmasked attention on this process, `[B, S, H, Dh]` in and out, with `backend`
    (None: diffusers' default)."""
    if backend == FLASH_4:
        return _flash_4(query, key, value)
    return dispatch_attention_fn(query, key, value, dropout_p=0.0, is_causal=False, backend=backend)


def candidate_backends(device: torch.device) -> list[str]:
    """Backends worth trying on `device`, fastest first (only those whose package imports)."""
    if device.type != "cuda":
        return ["native"]
    major, _ = torch.cuda.get_device_capability(device)
    names: list[str] = []
    if major in (9, 10):  # Hopper, Blackwell: the FA3/FA4 kernels
        names += [b for b in ("_flash_3", FLASH_4, "_flash_3_hub") if has_module(OPTIONAL_MODULES[b])]
    if has_module(OPTIONAL_MODULES["flash"]):
        names.append("flash")
    return [*names, "_native_cudnn", "native"]


def backend_works(backend: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Probe `backend` on a small input against the math kernel: a backend that is missing,
    unsupported or numerically wrong on this device must not serve requests."""
    try:
        if backend.endswith("_hub"):  # fetch (or find cached) the hub kernel, as set_attention_backend does
            from diffusers.models.attention_dispatch import _maybe_download_kernel_for_backend

            _maybe_download_kernel_for_backend(AttentionBackendName(backend))
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, 256, 4, 128, generator=gen, device=device, dtype=dtype) for _ in range(3))
        want = dispatch_attention_fn(q, k, v, backend=AttentionBackendName("_native_math"))
        got = local_attention(q, k, v, backend if backend == FLASH_4 else AttentionBackendName(backend))
        return bool((got.float() - want.float()).abs().max() < 2e-2)
    except Exception:  # ImportError, unsupported device/dtype/shape, no kernel in the cache: don't use it
        return False


def choose_backend(
    device: torch.device, dtype: torch.dtype = torch.bfloat16, forced: str | None = None
) -> str:
    """`forced` or `VAP_ATTENTION_BACKEND` if set (probed too: torch SDPA if it fails), else the
    first candidate that passes the probe."""
    forced = forced or os.environ.get(BACKEND_ENV)
    for backend in [forced] if forced else candidate_backends(device):
        if backend == "native" or backend_works(backend, device, dtype):
            return backend
        logger.warning("attention backend %s failed its probe on %s", backend, device)
    return "native"
