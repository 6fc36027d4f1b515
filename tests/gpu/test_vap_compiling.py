"""gpu/vap/compiling.py: the compiled blocks trace whole whatever the attention kernel, hold every
accepted size, and the default size is compiled before the first job."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from gpu.vap import attention
from gpu.vap import transformer as transformer_module
from gpu.vap.tiny import build_tiny_transformer

pytestmark = pytest.mark.slow


class _OpaqueFlash(torch.autograd.Function):
    """Stands in for FlashAttention 4's `flash_attn_func` (not installed here): same signature and
    result, `(out, lse)`, and, like its CuTe DSL launch, nothing Dynamo can trace inside."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
        torch.utils.dlpack.to_dlpack(q)  # as the CuTe DSL takes its tensors: Dynamo cannot trace it
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        return out, torch.zeros(q.shape[0], q.shape[2], q.shape[1])


def _flash_attn_func(q, k, v, softmax_scale=None, causal=False):
    return _OpaqueFlash.apply(q, k, v)


@pytest.fixture
def flash_4_standin(monkeypatch):
    monkeypatch.setattr(attention, "_flash_4_func", _flash_attn_func)
    monkeypatch.setattr(transformer_module, "has_module", lambda name: True)


@pytest.fixture
def dynamo_limits():
    """Dynamo's limits and caches as a fresh process has them, restored afterwards."""
    config: Any = torch._dynamo.config
    torch._dynamo.reset()
    with config.patch(recompile_limit=8, accumulated_recompile_limit=256):
        yield
    torch._dynamo.reset()


class _Counter:
    """A Dynamo backend that runs the captured graph as it is and counts the graphs."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        self.graphs += 1
        return gm.forward


def _step(model: Any, grid: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """One CFG step as the pipeline runs it (context and reference prepared, rows shared)."""
    from gpu.vap.geometry import IMAGE_TOKENS, TEXT_TOKENS

    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    text = torch.randn(2, TEXT_TOKENS, cfg["text_dim"], generator=g)
    image = torch.randn(2, IMAGE_TOKENS, cfg["image_dim"], generator=g)
    with torch.no_grad():
        reference = model.prepare_reference(torch.randn(1, 36, *grid, generator=g), text, image)
        context = model.prepare_context(text, image)
        latents = torch.randn(1, 36, *grid, generator=g).expand(2, -1, -1, -1, -1)
        return model(latents, torch.tensor(500.0).expand(2), reference=reference, context=context)[0]


def test_a_fullgraph_compile_traces_the_model_with_an_opaque_flash_kernel(flash_4_standin, dynamo_limits):
    model = build_tiny_transformer(0).eval()
    model.set_attention_backend("flash_4")
    eager = _step(model, (3, 4, 6))
    model.compile_repeated_blocks(fullgraph=True, backend=_Counter())
    assert torch.allclose(_step(model, (3, 4, 6)), eager, atol=1e-6)


def test_the_recompile_limits_cover_every_accepted_size(dynamo_limits):
    from gpu.tools.plan import accepted_sizes, gpu_frame_counts
    from gpu.vap import compiling
    from gpu.vap.geometry import RELEASED
    from gpu.vap.released import build_transformer

    sizes = {
        RELEASED.tokens_per_stream(frames, height, width)
        for _, _, width, height in accepted_sizes()
        for frames in gpu_frame_counts()
    }
    assert len(sizes) == 85 and len(sizes) <= compiling.COMPILED_SIZES
    released = build_transformer("meta")  # its own: compiling it must not touch the plan's model
    # Expert blocks: the first (reference Q/K/V given, CFG rows shared), the middle, the last.
    assert sorted(compiling.block_variants(released).values()) == [1, 3]
    compiling.compile_blocks(released, backend="eager")  # (wraps the blocks; nothing traced yet)
    config: Any = torch._dynamo.config
    assert config.recompile_limit >= 3 * len(sizes)
    assert config.accumulated_recompile_limit >= (3 + 1) * len(sizes)


def test_compiled_blocks_serve_more_sizes_than_dynamos_default_limit(dynamo_limits):
    # With fullgraph=True a forward past the recompile limit (8) is a hard error: a container
    # would fail every job of its ninth new size. Five sizes are ten graphs of the expert block.
    from gpu.vap import compiling

    model = build_tiny_transformer(0).eval()
    grids = [(3, 4, 6), (3, 4, 8), (5, 4, 6), (3, 6, 6), (7, 4, 6)]
    eager = [_step(model, grid) for grid in grids]
    counter = _Counter()
    compiling.compile_blocks(model, sizes=len(grids), backend=counter)
    for grid, want in zip(grids, eager, strict=True):
        assert torch.allclose(_step(model, grid), want, atol=1e-6)
    assert counter.graphs == sum(compiling.block_variants(model).values()) * len(grids) == 15


def test_warm_up_compiles_the_size_before_the_first_generation(dynamo_limits):
    import numpy as np
    import PIL.Image

    from gpu.vap import compiling
    from gpu.vap.geometry import image_tokens
    from gpu.vap.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(0)
    counter = _Counter()
    compiling.compile_blocks(pipe.transformer, sizes=1, backend=counter)
    height, width, frames = 32, 48, 9
    clip_tokens = image_tokens(pipe.image_encoder.config.to_dict())
    compiling.warm_up(pipe.transformer, [(frames, height, width)], image_tokens=clip_tokens)
    warmed = counter.graphs
    assert warmed == sum(compiling.block_variants(pipe.transformer).values())
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    with torch.inference_mode():
        pipe(
            image=image,
            ref_video=[image] * frames,
            prompt="a dog runs",
            prompt_mot_ref="a cat walks",
            height=height,
            width=width,
            num_frames=frames,
            num_inference_steps=2,
            output_type="latent",
        )
    assert counter.graphs == warmed  # the job's steps hit the graphs compiled at start-up
