"""Attention kernels for the VAP transformer: which one runs, and checks that prove it works.

Every attention of the model (the joint main+reference self-attention, the plain blocks' self-
attention, both cross-attentions) goes through `local_attention`. Backends are diffusers'
dispatcher names (`native`, `_native_cudnn`, `_flash_3`, `_flash_3_hub`, `flash`, ...) plus
`flash_4`: FlashAttention 4 from the PyPI package `flash-attn-4` (`flash_attn.cute`, CuTe DSL
kernels JIT-compiled for Hopper and Blackwell), which diffusers only offers through the hub.

`choose_backend(device)` tries the fastest candidate first and keeps the first one that passes
`backend_works` (a small probe against the math kernel); cuDNN SDPA is the Hopper fallback,
torch SDPA the last resort. A small probe does not prove the shapes the model really runs
(a joint attention past 2^31 elements, the sequence-parallel layouts, 257 image keys), so on a
GPU every call goes through the custom op `vap::attention`, which checks each new shape and
layout on its first call: sampled query rows of the kernel's output against float32 math
attention over all keys. A kernel that fails (wrong, or an error) is replaced for that shape
only, by the next candidate that passes. Being a custom op (with a fake implementation) it is
one opaque node to `torch.compile`, so a `fullgraph=True` compile traces the model whatever the
kernel is (FlashAttention 4 is a plain `autograd.Function` Dynamo cannot trace).

Layout: the model hands every self-attention Q/K/V in heads-major memory (`[B, H, S, D]`, seen
as `[B, S, H, D]`: `heads_major`), so that the kernels which need `[B, H, S, D]` contiguous
(cuDNN SDPA: diffusers copies Q, K and V otherwise, ~4.3 GiB each at 720p/121) read them as
they are and the flash kernels read them through their strides: every backend, the same memory.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import os
from collections.abc import Callable
from typing import Any

import torch
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

FLASH_4 = "flash_4"
NATIVE = "native"
BACKEND_ENV = "VAP_ATTENTION_BACKEND"
# Import name of each optional kernel package (the backend is only a candidate when it imports).
OPTIONAL_MODULES: dict[str, str] = {
    "_flash_3": "flash_attn_interface",  # FlashAttention 3 built from source (hopper/)
    FLASH_4: "flash_attn.cute",  # pip install flash-attn-4
    "_flash_3_hub": "kernels",  # FA3 from the `kernels` hub cache (needs the kernel downloaded)
    "flash": "flash_attn.flash_attn_interface",  # FlashAttention 2 (flash-attn; not the FA4 namespace)
}
# A shape's check: relative error (L2) of the sampled rows against float32 math attention. A
# right bf16 kernel is ~3e-3 off; a wrong one (bad indexing, overflow) is O(1) off.
CHECK_REL_TOL = 2e-2
CHECK_ROWS = 16  # query rows checked at each end of the sequence and spread between them

logger = logging.getLogger(__name__)

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_flash_4_func: Callable[..., Any] | None = None
_flash_4_writes_out = False


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is missing or half-installed
        return False


def output_like(query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """An uninitialised attention output, `[B, S_q, H, D_v]`, in the query's memory layout: what
    torch's SDPA kernels, cuDNN and FlashAttention 2/3 allocate (`empty_like(q)`), and the one
    layout `vap::attention` promises `torch.compile` (its fake implementation returns this)."""
    if value.shape[-1] == query.shape[-1]:
        return torch.empty_like(query)
    return query.new_empty(*query.shape[:-1], value.shape[-1])


def _flash_4_kernel() -> tuple[Callable[..., Any], bool]:
    """FlashAttention 4's forward, and whether it writes into a given `out` (its interface's
    `_flash_attn_fwd` does; `flash_attn_func` allocates a contiguous output of its own)."""
    interface = importlib.import_module("flash_attn.cute.interface")
    forward = getattr(interface, "_flash_attn_fwd", None)
    if forward is not None and "out" in inspect.signature(forward).parameters:
        return forward, True
    return importlib.import_module("flash_attn.cute").flash_attn_func, False


def _flash_4(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    out = output_like(query, value)
    if query.device.type == "meta":  # the memory plan: its output (in place) and the LSE
        query.new_empty(query.shape[0], query.shape[2], query.shape[1], dtype=torch.float32)
        return out
    global _flash_4_func, _flash_4_writes_out
    if _flash_4_func is None:
        _flash_4_func, _flash_4_writes_out = _flash_4_kernel()
    if _flash_4_writes_out:
        result = _flash_4_func(query, key, value, causal=False, out=out)
    else:
        result = _flash_4_func(query, key, value, causal=False)
    return result[0] if isinstance(result, tuple) else result


# Kernels this module runs itself rather than through diffusers' dispatcher: q, k, v -> out.
KERNELS: dict[str, Kernel] = {FLASH_4: _flash_4}


def backend_name(backend: Any) -> str:
    """A processor's backend (None, a diffusers `AttentionBackendName` or a str) as a name."""
    if backend is None:
        return NATIVE
    return str(backend.value if isinstance(backend, AttentionBackendName) else backend)


# -- layout ---------------------------------------------------------------------------------------


def empty_heads_major(
    batch: int, seq: int, heads: int, dim: int, like: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """An uninitialised `[B, S, H, D]` tensor whose memory is `[B, H, S, D]` contiguous."""
    return like.new_empty(batch, heads, seq, dim, dtype=dtype or like.dtype).transpose(1, 2)


def empty_heads_major_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped and typed like `x` (`[B, S, H, D]`), in heads-major memory."""
    batch, seq, heads, dim = x.shape
    return empty_heads_major(batch, seq, heads, dim, like=x)


def is_heads_major(x: torch.Tensor) -> bool:
    """Is `x` (`[B, S, H, D]`) a view of contiguous `[B, H, S, D]` memory?"""
    return x.transpose(1, 2).is_contiguous()


def heads_major(x: torch.Tensor) -> torch.Tensor:
    """`x` (`[B, S, H, D]`) in heads-major memory: itself if it already is, else a copy."""
    if is_heads_major(x):
        return x
    return empty_heads_major_like(x).copy_(x)


def heads_major_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """`torch.cat(parts, dim=1)` of `[B, S_i, H, D]` tensors (broadcast views too) into
    heads-major memory."""
    batch, _, heads, dim = parts[0].shape
    out = empty_heads_major(batch, sum(p.shape[1] for p in parts), heads, dim, like=parts[0])
    start = 0
    for part in parts:
        out[:, start : start + part.shape[1]].copy_(part)
        start += part.shape[1]
    return out


# -- kernels and the per-shape check -----------------------------------------------------------


def run_kernel(name: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`name`'s attention of `[B, S, H, D]` inputs, `[B, S_q, H, D_v]` in the query's layout
    (`output_like`; copied there only if the kernel chose another)."""
    kernel = KERNELS.get(name)
    if kernel is not None:
        out = kernel(query, key, value)
    else:
        out = dispatch_attention_fn(
            query, key, value, dropout_p=0.0, is_causal=False, backend=AttentionBackendName(name)
        )
    if not _same_layout(out, _output_strides(query, value)):
        out = output_like(query, value).copy_(out)
    return out


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _output_strides(query: torch.Tensor, value: torch.Tensor) -> tuple[int, ...]:
    """`output_like(query, value).stride()` without allocating: `empty_like` keeps the strides of
    a dense, non-overlapping tensor and makes anything else contiguous."""
    shape = (*query.shape[:-1], value.shape[-1])
    if value.shape[-1] != query.shape[-1]:
        return _contiguous_strides(shape)
    expected = 1
    for size, stride in sorted(zip(query.shape, query.stride(), strict=True), key=lambda d: d[1]):
        if size > 1 and stride != expected:
            return _contiguous_strides(shape)
        expected *= size
    return tuple(query.stride())


def _same_layout(x: torch.Tensor, strides: tuple[int, ...]) -> bool:
    # (a dimension of size 1 may have any stride)
    return all(size == 1 or a == b for size, a, b in zip(x.shape, x.stride(), strides, strict=True))


def check_rows(seq: int, rows: int = CHECK_ROWS) -> torch.Tensor:
    """Query rows a check compares: the first and last `rows` and `rows` spread between (the
    last rows hold the largest offsets, where 32-bit indexing would overflow)."""
    spread = torch.linspace(0, seq - 1, rows).round().long()
    edges = torch.cat([torch.arange(min(rows, seq)), torch.arange(max(seq - rows, 0), seq)])
    return torch.unique(torch.cat([edges, spread]))


def sampled_error(
    out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """Relative L2 error of `out` against float32 math attention on the check rows of the first
    and last heads (every batch row, all keys): a 0-d tensor. One head at a time, rows × keys:
    never the S² scores (~0.6 GB at 720p/121, batch 2)."""
    rows = check_rows(query.shape[1]).to(query.device)
    scale = 1.0 / math.sqrt(query.shape[-1])
    diff = want_sq = query.new_zeros((), dtype=torch.float32)
    for head in sorted({0, query.shape[2] - 1}):
        q = query[:, :, head].index_select(1, rows).float()  # [B, r, D]
        weights = torch.softmax((q @ key[:, :, head].float().transpose(1, 2)).mul_(scale), dim=-1)
        want = weights @ value[:, :, head].float()  # [B, r, D_v]
        del q, weights
        got = out[:, :, head].index_select(1, rows).float()
        diff = diff + (got - want).square().sum()
        want_sq = want_sq + want.square().sum()
    return (diff / want_sq.clamp_min(1e-30)).sqrt()


def _check_footprint(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """What `sampled_error` holds, allocated in its order on the meta device for the memory plan
    (empty tensors: no FLOPs for the FLOP counter; its rows counted at their most, so the plan
    stays affine in the sequence length)."""
    batch, keys, rows, f32 = query.shape[0], key.shape[1], 3 * CHECK_ROWS, torch.float32
    q = query.new_empty(batch, rows, query.shape[-1], dtype=f32)
    k = key.new_empty(batch, keys, key.shape[-1], dtype=f32)
    scores = query.new_empty(batch, rows, keys, dtype=f32)
    del k
    weights = query.new_empty(batch, rows, keys, dtype=f32)
    del scores
    v = value.new_empty(batch, keys, value.shape[-1], dtype=f32)
    want = query.new_empty(batch, rows, value.shape[-1], dtype=f32)
    del v, q, weights
    got = query.new_empty(batch, rows, value.shape[-1], dtype=f32)
    del got, want


# (requested kernel, shapes, strides, dtype, device) -> the kernel that serves that shape.
_SERVED: dict[tuple[Any, ...], str] = {}


def _signature(name: str, *tensors: torch.Tensor) -> tuple[Any, ...]:
    return (
        name,
        *(tuple(t.shape) for t in tensors),
        *(tuple(t.stride()) for t in tensors),
        tensors[0].dtype,
        str(tensors[0].device),
    )


def fallbacks(name: str, device: torch.device) -> list[str]:
    """`name`, then the candidates after it on `device` (all of them if it is not one), then torch
    SDPA: the kernels tried, in order, for a shape `name` fails."""
    candidates = candidate_backends(device)
    after = candidates[candidates.index(name) + 1 :] if name in candidates else candidates
    return list(dict.fromkeys([name, *after, NATIVE]))


def served_shapes() -> dict[tuple[Any, ...], str]:
    """Every shape checked so far in this process and the kernel serving it (a copy)."""
    return dict(_SERVED)


def checked_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: str
) -> torch.Tensor:
    """Attention with `backend`, checked against math attention on the first call of each shape
    and layout; a kernel that fails is replaced for that shape by the next one that passes."""
    signature = _signature(backend, query, key, value)
    served = _SERVED.get(signature)
    if served is not None:
        return run_kernel(served, query, key, value)
    if query.device.type == "meta":
        # The memory plan: the kernel and its check allocate as on the GPU; nothing to compare,
        # and nothing remembered (each traced size must run the same operations).
        out = run_kernel(backend, query, key, value)
        _check_footprint(query, key, value)
        return out
    failures: list[str] = []
    for name in fallbacks(backend, query.device):
        try:
            out = run_kernel(name, query, key, value)
            error = float(sampled_error(out, query, key, value))
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # unsupported shape/dtype/layout, missing package, kernel error
            failures.append(f"{name}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        if error <= CHECK_REL_TOL:
            _SERVED[signature] = name
            if failures:
                logger.warning(
                    "attention %s: %s serves it (%s)", _describe(query, key), name, "; ".join(failures)
                )
            return out
        failures.append(f"{name}: rel err {error:.2e} vs math attention")
        del out
    raise RuntimeError(f"no attention kernel computes {_describe(query, key)} right: {'; '.join(failures)}")


def _describe(query: torch.Tensor, key: torch.Tensor) -> str:
    return f"q {tuple(query.shape)} stride {query.stride()} over k {tuple(key.shape)} ({query.dtype})"


@torch.library.custom_op("vap::attention", mutates_args=())
def _attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: str) -> torch.Tensor:
    return checked_attention(query, key, value, backend)


@_attention_op.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: str) -> torch.Tensor:
    return output_like(query, value)


def local_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: Any
) -> torch.Tensor:
    """Unmasked attention on this process, `[B, S, H, Dh]` in and out, with `backend` (None:
    diffusers' default, torch SDPA). Off the CPU, or with a backend named, through the checked
    custom op (on the meta device its kernel and check run directly, for the memory plan)."""
    if backend is None and query.device.type == "cpu":
        return dispatch_attention_fn(query, key, value, dropout_p=0.0, is_causal=False)
    name = backend_name(backend)
    if query.device.type == "meta":
        return checked_attention(query, key, value, name)
    out: torch.Tensor = torch.ops.vap.attention(query, key, value, name)
    return out


# -- choosing at load time --------------------------------------------------------------------


def candidate_backends(device: torch.device) -> list[str]:
    """Backends worth trying on `device`, fastest first (only those whose package imports)."""
    if device.type != "cuda":
        return [NATIVE]
    major, _ = torch.cuda.get_device_capability(device)
    names: list[str] = []
    if major in (9, 10):  # Hopper, Blackwell: the FA3/FA4 kernels
        names += [b for b in ("_flash_3", FLASH_4, "_flash_3_hub") if has_module(OPTIONAL_MODULES[b])]
    if has_module(OPTIONAL_MODULES["flash"]):
        names.append("flash")
    return [*names, "_native_cudnn", NATIVE]


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
        got = run_kernel(backend, q, k, v)
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
        if backend == NATIVE or backend_works(backend, device, dtype):
            return backend
        logger.warning("attention backend %s failed its probe on %s", backend, device)
    return NATIVE
