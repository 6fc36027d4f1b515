"""GPU memory of one VAP generation, phase by phase, measured on the meta device.

Everything is counted from the models themselves (`gpu.vap.released`, `gpu.vap.metering`):

- weights: each component's parameters and buffers at its load dtype;
- encode: UMT5 over the 4 captions (512 tokens) and CLIP over 2 images — their peak activations;
- VAE: one encode of an F-frame video and the decode of its latents (peak activations,
  inputs and outputs included);
- denoise: what the pipeline keeps for the loop (reference stream, contexts and their K/V, the
  first expert block's reference Q/K/V) plus the peak of a denoising step, as the pipeline runs it
  (CFG rows shared, step-invariant work reused), for each attention kernel family that may serve
  it (`PLANNED_BACKENDS`: what each allocates, its per-shape check included), the largest kept;
- the rotary tables: their cache's bound (`gpu.vap.rotary.CACHE_BYTES`), resident like weights
  (a warm container keeps the last sizes' tables), so they are left out of the denoising trace.

The denoising phase has the same sequence of operations for every token count S, and every tensor
in it has a size affine in S (tokens, or the fixed context). So the live-bytes timeline at any S
is the affine interpolation of the timelines traced at two token counts, operation by operation,
and its peak is exact without tracing each size (`DenoiseModel`; a test checks a third size).
The VAE's operations depend on the frame count (it runs frame by frame), so it is traced per
resolution at the longest accepted video; more frames never lower its peak (a test checks it),
so that figure bounds every shorter video at that resolution.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.models.transformers.transformer_wan import WanAttention

from gpu.vap.attention import FLASH_4, NATIVE
from gpu.vap.geometry import IMAGE_TOKENS, RELEASED, TEXT_TOKENS, Grid, geometry_of
from gpu.vap.metering import CudaKernels, LiveBytes, module_bytes
from gpu.vap.released import Components, build_components
from gpu.vap.rotary import CACHE_BYTES
from gpu.vap.transformer import WanTransformer3DMOTModel

LATENT_CHANNELS = 16
CONDITION_CHANNELS = 20  # 4 mask + 16 condition latents
# The attention kernels' allocation families a GPU may run (`gpu.vap.attention`): torch SDPA (and
# FlashAttention 2/3, which allocate alike: output like Q, LSE), cuDNN SDPA through diffusers
# (its layout copies), FlashAttention 4 (output given, LSE).
PLANNED_BACKENDS = (NATIVE, "_native_cudnn", FLASH_4)


def sequence_exchange(tokens: int, gpus: int, batch: int = 2) -> int:
    """Bytes one GPU of a sequence-parallel job holds for the Ulysses all-to-alls, on top of the
    single-GPU trace at its share of the tokens (`tokens` per stream, whole video): for each of Q,
    K and V of the joint main + reference attention, a contiguous send copy and the received
    tensor (copied once into heads-major memory, which every kernel reads as it is), each the
    size of the local Q. All six counted live at once (the send copies stay until their exchange
    is waited on): an upper bound. `batch`: the CFG rows."""
    if gpus == 1:
        return 0
    transformer = components().transformer
    assert transformer is not None
    cfg = transformer.config
    dim = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    local_rows = 2 * -(-tokens // gpus)  # main + reference slices
    return 6 * batch * local_rows * dim * transformer.dtype.itemsize


@dataclass(frozen=True)
class Weights:
    transformer: int
    text_encoder: int
    image_encoder: int
    vae: int
    safety: int
    rotary_cache: int  # the bound of the rotary tables' cache (gpu.vap.rotary)


@functools.cache
def components() -> Components:
    return build_components("meta")


@functools.cache
def weights() -> Weights:
    c = components()
    assert c.transformer is not None and c.safety_checker is not None
    return Weights(
        transformer=module_bytes(c.transformer),
        text_encoder=module_bytes(c.text_encoder),
        image_encoder=module_bytes(c.image_encoder),
        vae=module_bytes(c.vae),
        safety=module_bytes(c.safety_checker),
        rotary_cache=CACHE_BYTES,
    )


@contextlib.contextmanager
def attention_backend(model: torch.nn.Module, backend: str) -> Iterator[None]:
    """Every attention of `model` through `backend` for a meta-device trace (its package need
    not be installed: on the meta device `gpu.vap.attention` only allocates like it)."""
    processors: list[Any] = [m.processor for m in model.modules() if isinstance(m, WanAttention)]
    saved = [getattr(p, "_attention_backend", None) for p in processors]
    for processor in processors:
        processor._attention_backend = None if backend == NATIVE else backend
    try:
        yield
    finally:
        for processor, old in zip(processors, saved, strict=True):
            processor._attention_backend = old


def _traced(module: torch.nn.Module, run: Callable[[], Any]) -> LiveBytes:
    tracker = LiveBytes(ignore=[*module.parameters(), *module.buffers()])
    with torch.no_grad(), CudaKernels(), tracker:
        run()
    return tracker


@dataclass(frozen=True)
class Encode:
    peak: int  # activations of the larger of the two encoders' runs
    outputs: int  # text + image states kept for the rest of the generation


@functools.cache
def encode() -> Encode:
    c = components()
    meta = torch.device("meta")
    kept: list[torch.Tensor] = []

    def text() -> None:
        ids = torch.zeros(4, TEXT_TOKENS, dtype=torch.long, device=meta)
        # (no padding mask: its all-ones check needs real data; it is 4×512 booleans)
        states = c.text_encoder(ids).last_hidden_state
        kept.append(states.to(torch.bfloat16))

    def image() -> None:
        pixels = torch.empty(2, 3, 224, 224, device=meta, dtype=c.image_encoder.dtype)
        hidden = c.image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        kept.append(hidden.to(torch.bfloat16))

    peaks = [_traced(c.text_encoder, text).peak, _traced(c.image_encoder, image).peak]
    return Encode(peak=max(peaks), outputs=sum(t.numel() * t.element_size() for t in kept))


@dataclass(frozen=True)
class Vae:
    encode: int  # peak of one encode, its input video included
    latents: int  # one encode's output (three are kept: target, reference, reference condition)
    decode: int  # peak of the decode, the output video included


@functools.cache
def vae(num_frames: int, height: int, width: int) -> Vae:
    """VAE peaks for one video size (fp32, as loaded). Transposed sizes allocate the same (every
    convolution and padding is symmetric in height and width); more frames never allocate less."""
    return vae_peaks(components().vae, num_frames, height, width)


def vae_peaks(model: Any, num_frames: int, height: int, width: int) -> Vae:
    f, h, w = RELEASED.latent_grid(num_frames, height, width)
    out: dict[str, int] = {}

    def encode_once() -> None:
        video = torch.empty(1, 3, num_frames, height, width, device="meta", dtype=model.dtype)
        latents = model.encode(video).latent_dist.mode()
        del video
        out["latents"] = latents.numel() * latents.element_size()

    def decode_once() -> None:
        latents = torch.empty(1, LATENT_CHANNELS, f, h, w, device="meta", dtype=model.dtype)
        model.decode(latents, return_dict=False)

    enc = _traced(model, encode_once).peak
    return Vae(encode=enc, latents=out["latents"], decode=_traced(model, decode_once).peak)


def denoise_timeline(
    model: WanTransformer3DMOTModel,
    grid: Grid,
    steps: int = 2,
    text_dim: int | None = None,
    image_dim: int | None = None,
) -> list[int]:
    """Live bytes after each operation of the pipeline's denoising phase for latent `grid`:
    reference + context preparation, then `steps` CFG steps (batch 2, rows shared). The rotary
    tables are made before the trace (their cache's bound is planned as resident)."""
    cfg = model.config
    text_dim = text_dim or int(cfg["text_dim"])
    image_dim = image_dim or int(cfg["image_dim"])
    dtype = model.dtype
    meta = torch.device("meta")
    model.rotary(grid, meta, reference=True)
    model.rotary(grid, meta)

    def run() -> None:
        f, h, w = grid
        text = torch.empty(4, TEXT_TOKENS, text_dim, device=meta, dtype=dtype)
        clip = torch.empty(2, IMAGE_TOKENS, image_dim, device=meta, dtype=dtype)
        condition = torch.empty(1, CONDITION_CHANNELS, f, h, w, device=meta)
        ref_input = torch.empty(1, int(cfg["in_channels"]), f, h, w, device=meta)
        latents = torch.empty(1, LATENT_CHANNELS, f, h, w, device=meta)
        reference = model.prepare_reference(ref_input.to(dtype), text[2:], clip[1:].expand(2, -1, -1))
        context = model.prepare_context(text[:2], clip[:1].expand(2, -1, -1))
        del text, clip, ref_input
        for step in range(steps):
            model_in = torch.cat([latents, condition], dim=1).to(dtype)
            t = torch.tensor(999 - step, device=meta)
            pred = model(
                model_in.expand(2, -1, -1, -1, -1),
                t.expand(2),
                reference=reference,
                context=context,
                return_dict=False,
            )[0]
            del model_in
            cond, uncond = pred.chunk(2)
            pred = uncond + 5.0 * (cond - uncond)
            latents = latents + pred.float()  # the scheduler's update (its small state is in the margin)
            del cond, uncond, pred

    return _traced(model, run).timeline


class DenoiseModel:
    """Exact live-bytes timeline of the denoising phase as a function of the tokens per stream
    (one attention backend: the model's, or `backend`)."""

    def __init__(
        self,
        model: WanTransformer3DMOTModel,
        grids: tuple[Grid, Grid],
        backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        (g1, g2) = grids
        self.tokens = (self._tokens(model, g1), self._tokens(model, g2))
        if self.tokens[0] == self.tokens[1]:
            raise ValueError("two different token counts are needed")
        using = attention_backend(model, backend) if backend else contextlib.nullcontext()
        with using:
            t1, t2 = (np.asarray(denoise_timeline(model, g, **kwargs), dtype=np.float64) for g in (g1, g2))
        if t1.shape != t2.shape:
            raise RuntimeError("the denoising phase's operations depend on the size: cannot interpolate")
        self._base, self._slope = t1, (t2 - t1) / (self.tokens[1] - self.tokens[0])

    @staticmethod
    def _tokens(model: WanTransformer3DMOTModel, grid: Grid) -> int:
        return geometry_of(model.config).tokens(grid)

    def peak(self, tokens: int) -> int:
        """Peak live bytes for `tokens` per stream (the same for any grid with that many tokens)."""
        return round(float(np.max(self._base + self._slope * (tokens - self.tokens[0]))))


class PlannedDenoise:
    """The denoising phase's peak over every attention kernel family a GPU may run."""

    def __init__(self, models: dict[str, DenoiseModel]) -> None:
        self.models = models

    def peak(self, tokens: int) -> int:
        return max(m.peak(tokens) for m in self.models.values())


@functools.cache
def denoise_model() -> PlannedDenoise:
    """The released transformer, traced at the smallest and largest accepted videos' grids, once
    per attention kernel family (`PLANNED_BACKENDS`)."""
    small, large = RELEASED.latent_grid(9, 480, 832), RELEASED.latent_grid(121, 720, 1280)
    transformer = components().transformer
    assert transformer is not None
    return PlannedDenoise({b: DenoiseModel(transformer, (small, large), backend=b) for b in PLANNED_BACKENDS})
