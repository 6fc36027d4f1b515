"""Sequence parallel against one process, on the tiny model, on CPU (gloo): prints `rel_err=<x>`.

    python -m gpu.tools.check_parallel --world-size 2        # exits 1 if rel_err > 1e-5
    python -m gpu.tools.check_parallel --world-size 2 4

For each world size, `SequenceParallelEngine` spawns the ranks and the same work runs split and
on one process: (1) transformer calls with CFG batch 2 (separate rows, raw context), on a token
count that divides evenly and one that does not; (2) two steps as the pipeline runs them (context
and reference prepared once, CFG rows as views of one row, so block 0's reference Q/K/V is cached
on each rank after the split); (3) the whole pipeline for a few steps (CFG batch 2, reference
stream), compared on the final latents; (4) `Engine.generate` (uint8 frames, equal up to one
level of rounding, else it fails). rel_err = max over (1)-(3) of ‖split − single‖ / ‖single‖.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import PIL.Image
import torch

from gpu.service.engines.loaders import TinyPipeline
from gpu.service.engines.sequence_parallel import SequenceParallelEngine
from gpu.service.engines.single import VideoEngine
from gpu.service.generation import GenerationSpec
from gpu.vap.geometry import TEXT_TOKENS

TOLERANCE = 1e-5
# Pixel size of the pipeline runs: 9 frames × 32 × 48 → 3 × 2 × 3 = 18 tokens per stream
# (9 + 9 on 2 ranks; 5 + 5 + 4 + 4 on 4: the uneven path).
HEIGHT, WIDTH, FRAMES = 32, 48, 9
# Latent grids of the direct transformer calls: 18 tokens (1 × 2 × 3 per frame), and 45 (uneven on 2 and 4).
GRIDS = ((3, 4, 6), (3, 6, 10))


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def _frames(seed: int, n: int) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)) for _ in range(n)]


def _transformer_inputs(
    grid: tuple[int, int, int], seed: int, text_dim: int, image_dim: int
) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    f, h, w = grid
    return {
        "hidden_states": torch.randn(2, 36, f, h, w, generator=g),
        "timestep": torch.tensor([700, 700]),
        "encoder_hidden_states": torch.randn(2, TEXT_TOKENS, text_dim, generator=g),
        "encoder_hidden_states_image": torch.randn(2, 5, image_dim, generator=g),
        "hidden_states_mot_ref": torch.randn(1, 36, f, h, w, generator=g),
        "encoder_hidden_states_mot_ref": torch.randn(2, TEXT_TOKENS, text_dim, generator=g),
        "encoder_hidden_states_image_mot_ref": torch.randn(2, 5, image_dim, generator=g),
        "return_dict": False,
    }


def _steady_steps(model: Any, inputs: dict[str, Any]) -> list[torch.Tensor]:
    """Two calls as the pipeline makes them: per-video context/reference, CFG rows as views."""
    reference = model.prepare_reference(
        inputs["hidden_states_mot_ref"],
        inputs["encoder_hidden_states_mot_ref"],
        inputs["encoder_hidden_states_image_mot_ref"],
    )
    context = model.prepare_context(inputs["encoder_hidden_states"], inputs["encoder_hidden_states_image"])
    outs = []
    for t in (900, 700):
        latents = inputs["hidden_states"][:1] * (t / 1000)
        rows, timestep = latents.expand(2, -1, -1, -1, -1), torch.tensor(t).expand(2)
        outs.append(model(rows, timestep, reference=reference, context=context, return_dict=False)[0])
    if reference.first_expert_qkv is None:
        raise RuntimeError("block 0's reference Q/K/V were not cached")
    return outs


def _run_all(pipe: Any, engine: Any, steps: int) -> dict[str, Any]:
    """The same work on one process (`pipe`/`engine` plain) or split (the parallel engine's)."""
    cfg = pipe.transformer.config
    out: dict[str, Any] = {}
    with torch.inference_mode():
        for i, grid in enumerate(GRIDS):
            inputs = _transformer_inputs(grid, i, cfg["text_dim"], cfg["image_dim"])
            out[f"transformer {grid}"] = pipe.transformer(**inputs)[0]
            for k, step in enumerate(_steady_steps(pipe.transformer, inputs), start=1):
                out[f"transformer {grid}, steady step {k}"] = step
        out[f"pipeline latents, {steps} steps, CFG"] = pipe(
            image=_frames(1, 1)[0],
            ref_video=_frames(2, FRAMES),
            prompt="a woman turns to the camera",
            prompt_mot_ref="a man turns into a toy character",
            height=HEIGHT,
            width=WIDTH,
            num_frames=FRAMES,
            num_inference_steps=steps,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).frames
    spec = GenerationSpec(
        prompt="a cat dancing", ref_prompt="a man dancing", width=WIDTH, height=HEIGHT, num_frames=FRAMES,
        requested_frames=FRAMES, fps=16, seed=3, guidance_scale=5.0, steps=steps, safety=False,
    )  # fmt: skip
    clip = _frames(4, FRAMES)
    out["engine frames"] = engine.generate(spec, clip[0], clip, lambda *_: None)
    return out


class FramesDiffer(AssertionError):
    """The split engine's uint8 frames differ from one process's by more than rounding."""


def check(world_sizes: list[int], steps: int = 2, seed: int = 0) -> float:
    """Worst rel_err of each world size against one process (raises if the work was not split)."""
    # One tiny model for all: heads divisible by every world size (the split is over heads).
    loader = TinyPipeline(seed, heads=math.lcm(2, *world_sizes))
    single_pipe = loader(torch.device("cpu"))
    want = _run_all(single_pipe, VideoEngine(single_pipe, "cpu"), steps)
    worst = 0.0
    for world in world_sizes:
        started = time.monotonic()
        engine = SequenceParallelEngine(loader, world, device_type="cpu", threads_per_rank=1)
        try:
            got = _run_all(engine.pipeline, engine, steps)
            sp = engine.split
            if sp.exchanges == 0:
                raise RuntimeError("the transformer ran without sequence-parallel exchanges")
            split, sent = sp.last_split, sp.sent_elements
        finally:
            engine.close()
        for name, single in want.items():
            if name == "engine frames":
                diff = int(np.abs(got[name].astype(np.int16) - single.astype(np.int16)).max())
                print(f"  world {world}: {name}: max |uint8 diff| = {diff}")
                if diff > 1:  # rounding may flip one level; more is a real difference
                    raise FramesDiffer(f"world {world}: frames differ by up to {diff} levels")
                continue
            err = _rel(got[name], single)
            worst = max(worst, err)
            print(f"  world {world}: {name}: rel_err {err:.2e}")
        print(f"  world {world}: last call: tokens per rank (main, ref) {split}, "
              f"all-to-all elements sent by rank 0 {sent}; {time.monotonic() - started:.1f} s")  # fmt: skip
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world-size", type=int, nargs="+", default=[2])
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        worst = check(args.world_size, args.steps)
    except FramesDiffer as exc:
        print(f"FAIL: {exc}")
        return 1
    ok = worst <= TOLERANCE
    print(f"rel_err={worst:.3e} ({'ok' if ok else 'FAIL'}: limit {TOLERANCE:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
