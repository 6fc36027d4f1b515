"""Regional `torch.compile` of the VAP transformer: one graph per block variant and token count,
enough of Dynamo's cache for every size the service accepts, the default size compiled up front.

- **Traceable whole.** `compile_repeated_blocks(fullgraph=True)` compiles `VAPBlock.forward` and
  `VAPExpertBlock.forward`; every attention in them is the custom op `vap::attention`
  (`gpu.vap.attention`), one opaque node whatever kernel serves it, so FlashAttention 4's
  `autograd.Function` never meets Dynamo.
- **Static shapes** (`dynamic=False`): each token count gets its own graph (the rotary split and
  the kernels specialise on it; a symbolic length would recompile on its divisibility guards
  anyway). Each block forward needs one graph per *variant* per size: the first expert block
  (reference Q/K/V given, CFG rows shared), the middle ones, the last one (no reference output)
  are three graphs of `VAPExpertBlock.forward`.
- **The cache is sized for every accepted size.** With `fullgraph=True`, a forward past Dynamo's
  recompile limit (8 by default) is a hard error, so the ninth new size would fail every job:
  `compile_blocks` raises the limits to `graphs_per_size × COMPILED_SIZES`.
- **Compiled while the container starts.** `warm_up` runs one CFG step per given size with random
  inputs, so the default size's graphs exist before the first job; other sizes compile on their
  first job (once per container). Memory: the warm-up is one denoising step of that size, which
  the plan covers (the step of a job of that size); the compiled step allocates no more than the
  eager one the plan traces (attention is the same kernel; inductor frees each buffer at its last
  use), which `gpu.tools.bench --full` measures (compiled rows: peak GiB).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from gpu.vap.geometry import IMAGE_TOKENS, TEXT_TOKENS, geometry_of
from gpu.vap.transformer import VAPBlock, VAPExpertBlock, WanTransformer3DMOTModel

# Distinct token counts the compiled blocks may meet: the service accepts 85 (480p/576p/720p,
# either orientation, 9-121 frames; tests/gpu/test_vap_compiling.py holds this above them).
COMPILED_SIZES = 128
# The default job's size (frames, height, width): the pipeline's defaults, which are the
# service's default job too (480p, 49 frames; either orientation has the same token count).
DEFAULT_SIZES: tuple[tuple[int, int, int], ...] = ((49, 480, 832),)


def block_variants(model: WanTransformer3DMOTModel) -> dict[Any, int]:
    """Graphs each compiled block forward (a code object Dynamo caches) needs per token count."""
    experts = model.expert_blocks
    seen: dict[Any, set[tuple[bool, bool, bool]]] = {}
    for i, block in enumerate(model.blocks):
        assert isinstance(block, VAPBlock)
        first = bool(experts) and i == experts[0]
        needed = isinstance(block, VAPExpertBlock) and model._ref_output_needed(i)
        # (reference Q/K/V passed in, reference output needed, CFG rows still one row)
        seen.setdefault(type(block).forward, set()).add((first, needed, i == 0))
    return {code: len(variants) for code, variants in seen.items()}


def recompile_limits(model: WanTransformer3DMOTModel, sizes: int = COMPILED_SIZES) -> tuple[int, int]:
    """(per block forward, over all of them) cache entries for `sizes` token counts."""
    variants = block_variants(model)
    return max(variants.values()) * sizes, sum(variants.values()) * sizes


def compile_blocks(
    model: WanTransformer3DMOTModel, sizes: int = COMPILED_SIZES, backend: str = "inductor"
) -> None:
    """Regional compile of `model`'s blocks (`fullgraph=True`, static shapes), with Dynamo's
    recompile limits raised (never lowered) to hold `sizes` token counts."""
    per_code, total = recompile_limits(model, sizes)
    config: Any = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, per_code)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, total)
    model.compile_repeated_blocks(fullgraph=True, dynamic=False, backend=backend)


def warm_up(
    model: WanTransformer3DMOTModel,
    sizes: Iterable[tuple[int, int, int]] = DEFAULT_SIZES,
    seed: int = 0,
    image_tokens: int = IMAGE_TOKENS,
) -> None:
    """One CFG denoising step per `(frames, height, width)` with random inputs, as the pipeline
    runs it (context and reference prepared once, the two rows one shared row): compiles those
    sizes' graphs and checks their attention shapes (`gpu.vap.attention`) before any job.
    `image_tokens`: the image encoder's tokens per image (the released CLIP's 257)."""
    cfg = model.config
    param = next(model.parameters())
    device, dtype = param.device, model.dtype
    geometry = geometry_of(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    channels = int(cfg["in_channels"])
    text, image = int(cfg["text_dim"]), int(cfg["image_dim"])
    with torch.inference_mode():
        for frames, height, width in sizes:
            grid = geometry.latent_grid(frames, height, width)
            reference = model.prepare_reference(
                rand(1, channels, *grid), rand(2, TEXT_TOKENS, text), rand(2, image_tokens, image)
            )
            context = model.prepare_context(rand(2, TEXT_TOKENS, text), rand(2, image_tokens, image))
            latents = rand(1, channels, *grid).expand(2, -1, -1, -1, -1)
            timestep = torch.tensor(999.0, device=device).expand(2)
            model(latents, timestep, reference=reference, context=context, return_dict=False)
            del reference, context, latents
