"""The VAP model: tiny pipeline end to end on CPU, names, expert blocks, CFG batching, shortcuts."""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import PIL.Image
import pytest
import torch

from gpu.vap.configs import RELEASED_14B_CONFIG
from gpu.vap.rotary import rotary_tables
from gpu.vap.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_pipeline, build_tiny_transformer
from gpu.vap.transformer import KEEP_IN_FP32, VAPExpertBlock, WanTransformer3DMOTModel

pytestmark = pytest.mark.slow

H, W, F = 16, 32, 9


def _frames(seed: int, n: int) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(seed=0)


def _inputs(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dim, img = TINY_TRANSFORMER_CONFIG["text_dim"], TINY_TRANSFORMER_CONFIG["image_dim"]
    return {
        "hidden_states": torch.randn(batch, 36, 3, 4, 6, generator=g),
        "timestep": torch.tensor([700] * batch),
        "encoder_hidden_states": torch.randn(batch, 512, dim, generator=g),
        "encoder_hidden_states_image": torch.randn(batch, 5, img, generator=g),
        "hidden_states_mot_ref": torch.randn(1, 36, 3, 4, 6, generator=g),
        "encoder_hidden_states_mot_ref": torch.randn(batch, 512, dim, generator=g),
        "encoder_hidden_states_image_mot_ref": torch.randn(batch, 5, img, generator=g),
    }


def _run(model: WanTransformer3DMOTModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _generate(pipe: Any, **overrides: Any) -> Any:
    """A 2-step generation of the test clip with the tiny pipeline (seed 0)."""
    kwargs: dict[str, Any] = dict(
        image=_frames(1, 1)[0],
        ref_video=_frames(2, F),
        prompt="a woman turns to the camera",
        prompt_mot_ref="a man turns into a toy character",
        height=H,
        width=W,
        num_frames=F,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    return pipe(**{**kwargs, **overrides})


def _latent_kwargs(steps: int) -> dict[str, Any]:
    """A short 5-frame generation that stops at the latents (comparisons between two runs)."""
    return dict(
        image=_frames(1, 1)[0],
        ref_video=_frames(2, 5),
        prompt="a dog runs",
        prompt_mot_ref="a cat walks",
        height=H,
        width=W,
        num_frames=5,
        num_inference_steps=steps,
        output_type="latent",
    )


def test_tiny_pipeline_end_to_end(pipe):
    steps: list[int] = []

    def on_step(p, i, t, kwargs):
        steps.append(i)
        assert set(kwargs) == {"latents"}
        return {}

    out = _generate(pipe, guidance_scale=5.0, callback_on_step_end=on_step)
    frames = out.frames
    assert isinstance(frames, np.ndarray)
    assert frames.shape == (1, F, H, W, 3)
    assert frames.dtype == np.float32
    assert np.isfinite(frames).all() and frames.min() >= 0.0 and frames.max() <= 1.0
    assert steps == [0, 1]


def test_pipeline_is_deterministic_per_seed(pipe):
    kwargs = _latent_kwargs(steps=1)
    a = pipe(**kwargs, generator=torch.Generator().manual_seed(3)).frames
    b = pipe(**kwargs, generator=torch.Generator().manual_seed(3)).frames
    c = pipe(**kwargs, generator=torch.Generator().manual_seed(4)).frames
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_caption_is_one_string_not_chars(pipe):
    assert pipe.encode_text(["a man walks"]).shape[0] == 1
    with pytest.raises(TypeError):
        pipe(image=_frames(1, 1)[0], ref_video=_frames(2, F), prompt="x", prompt_mot_ref=["x"])


def test_pipeline_rejects_bad_sizes(pipe):
    common = dict(image=_frames(1, 1)[0], ref_video=_frames(2, F), prompt="a", prompt_mot_ref="b")
    with pytest.raises(ValueError):
        pipe(**common, height=20, width=W, num_frames=F)
    with pytest.raises(ValueError):
        pipe(**common, height=H, width=W, num_frames=8)
    with pytest.raises(ValueError):
        pipe(**common, height=H, width=W, num_frames=F, max_sequence_length=256)


def test_reference_schedule_timesteps(pipe):
    # The fork's UniPC flow schedule at 50 steps starts 999, 992, 985 (diffusers 0.42.1: 999, 993, ...).
    assert pipe._set_timesteps(50)[:3].tolist() == [999, 992, 985]


def test_base_names_are_upstream_diffusers():
    from diffusers import WanTransformer3DModel

    model = build_tiny_transformer(0)
    base_sd = {k: v for k, v in model.state_dict().items() if "_mot_ref" not in k}
    cfg = {k: v for k, v in TINY_TRANSFORMER_CONFIG.items() if k != "block_idx_with_mot_ref"}
    upstream = WanTransformer3DModel(**cfg)
    upstream.load_state_dict(base_sd, strict=True)


def test_expert_blocks_follow_config():
    model = build_tiny_transformer(0)
    experts = set(TINY_TRANSFORMER_CONFIG["block_idx_with_mot_ref"])
    for i, block in enumerate(model.blocks):
        assert isinstance(block, VAPExpertBlock) == (i in experts)
        has_ref = any("_mot_ref" in k for k in block.state_dict())
        assert has_ref == (i in experts)
    expected = {
        "scale_shift_table_mot_ref",
        "attn1_mot_ref.to_q.weight",
        "attn2_mot_ref.add_k_proj.weight",
        "attn2_mot_ref.add_v_proj.bias",
        "attn2_mot_ref.norm_added_k.weight",
        "norm2_mot_ref.weight",
        "ffn_mot_ref.net.0.proj.weight",
        "ffn_mot_ref.net.2.bias",
    }
    assert expected <= set(model.blocks[0].state_dict())
    top = {k.split(".")[0] for k in model.state_dict()}
    assert {"patch_embedding_mot_ref", "condition_embedder_mot_ref"} <= top


def test_cfg_batch_of_two_equals_two_calls():
    model = build_tiny_transformer(0).eval()
    both = _inputs(2, seed=1)
    out = _run(model, both)
    for i in range(2):
        single = {k: (v if k == "hidden_states_mot_ref" else v[i : i + 1]) for k, v in both.items()}
        torch.testing.assert_close(out[i : i + 1], _run(model, single), rtol=1e-5, atol=1e-6)


def test_skipping_dead_reference_work_changes_nothing():
    model = build_tiny_transformer(0).eval()
    inputs = _inputs(2, seed=2)
    fast = _run(model, inputs)
    model.skip_dead_reference_work = False
    full = _run(model, inputs)
    torch.testing.assert_close(fast, full, rtol=1e-6, atol=1e-7)


def test_fused_qkv_projections_change_nothing():
    model = build_tiny_transformer(0).eval()
    inputs = _inputs(2, seed=5)
    plain = _run(model, inputs)
    model.fuse_qkv_projections()
    torch.testing.assert_close(_run(model, inputs), plain, rtol=1e-5, atol=1e-6)


def test_interrupt_stops_the_loop(pipe):
    seen: list[int] = []

    def stop_after_first(p, i, t, kwargs):
        seen.append(i)
        p._interrupt = True
        return {}

    out = pipe(
        image=_frames(1, 1)[0],
        ref_video=_frames(2, 5),
        prompt="a dog runs",
        prompt_mot_ref="a cat walks",
        height=H,
        width=W,
        num_frames=5,
        num_inference_steps=3,
        output_type="latent",
        callback_on_step_end=stop_after_first,
    )
    assert seen == [0] and out.frames.shape[0] == 1


def test_precomputed_reference_equals_raw_inputs():
    model = build_tiny_transformer(0).eval()
    inputs = _inputs(2, seed=3)
    raw = _run(model, inputs)
    with torch.no_grad():
        ref = model.prepare_reference(
            inputs["hidden_states_mot_ref"],
            inputs["encoder_hidden_states_mot_ref"],
            inputs["encoder_hidden_states_image_mot_ref"],
        )
        pre = model(
            inputs["hidden_states"],
            inputs["timestep"],
            inputs["encoder_hidden_states"],
            inputs["encoder_hidden_states_image"],
            reference=ref,
            return_dict=False,
        )[0]
    torch.testing.assert_close(pre, raw, rtol=0, atol=0)


def test_reference_stream_changes_output():
    model = build_tiny_transformer(0).eval()
    inputs = _inputs(1, seed=4)
    a = _run(model, inputs)
    inputs["hidden_states_mot_ref"] = inputs["hidden_states_mot_ref"] + 1.0
    assert not torch.allclose(a, _run(model, inputs))


def test_reference_rotary_is_temporally_biased():
    cos0, _ = rotary_tables(24, (3, 2, 2), t_start=0)
    cosr, sinr = rotary_tables(24, (3, 2, 2), t_start=-3)
    # Spatial channels (last 2/3 of the pairs) are shared; temporal ones are shifted by -F.
    torch.testing.assert_close(cos0[..., 8:], cosr[..., 8:])
    angle = torch.atan2(sinr[0, 0, 0, 2], cosr[0, 0, 0, 2])  # first time pair, frame 0 -> pos -3
    assert torch.isclose(angle, torch.tensor(-3.0 * 10000 ** (-2 / 8)), atol=1e-6)


def test_released_14b_layout_on_meta_device():
    cfg = RELEASED_14B_CONFIG
    with torch.device("meta"):
        model = WanTransformer3DMOTModel(**cfg)
    sd = model.state_dict()
    assert len(sd) == 1643
    total = sum(v.numel() for v in sd.values())
    expert = sum(v.numel() for k, v in sd.items() if "_mot_ref" in k)
    assert round(total / 1e9, 2) == 20.67
    assert round(expert / 1e9, 2) == 4.28
    fp32 = [k for k in sd if any(part in KEEP_IN_FP32 for part in k.split("."))]
    assert len(fp32) == 137


def test_reusing_step_invariants_changes_nothing():
    # The pipeline's way: CFG rows as views of one row, context/reference prepared once, several
    # steps (the first fills the memo of the first expert block's reference Q/K/V).
    model = build_tiny_transformer(0).eval()
    raw = _inputs(2, seed=6)
    latents = raw["hidden_states"][:1].expand(2, -1, -1, -1, -1)
    with torch.no_grad():
        ref = model.prepare_reference(
            raw["hidden_states_mot_ref"],
            raw["encoder_hidden_states_mot_ref"],
            raw["encoder_hidden_states_image_mot_ref"],
        )
        ctx = model.prepare_context(raw["encoder_hidden_states"], raw["encoder_hidden_states_image"])
        fast = []
        for t in (900, 500):
            step = torch.tensor(t).expand(2)
            fast.append(model(latents, step, reference=ref, context=ctx, return_dict=False)[0])
        assert ref.first_expert_qkv is not None and len(ctx.kv) == len(model.blocks)
    model.reuse_step_invariants = False
    for out, t in zip(fast, (900, 500), strict=True):
        plain = {**raw, "hidden_states": latents.contiguous(), "timestep": torch.tensor([t, t])}
        # Same math; batch 1 vs 2 GEMMs may block differently (float32 rounding, as the CFG test).
        torch.testing.assert_close(out, _run(model, plain), rtol=1e-5, atol=1e-6)


def test_precomputed_context_equals_raw_inputs():
    model = build_tiny_transformer(0).eval()
    inputs = _inputs(2, seed=7)
    raw = _run(model, inputs)
    with torch.no_grad():
        ctx = model.prepare_context(inputs["encoder_hidden_states"], inputs["encoder_hidden_states_image"])
        rest = {k: v for k, v in inputs.items() if not k.startswith("encoder_hidden_states")}
        rest |= {k: v for k, v in inputs.items() if k.endswith("_mot_ref")}
        pre = model(**rest, context=ctx, return_dict=False)[0]
    torch.testing.assert_close(pre, raw, rtol=0, atol=0)


def test_the_loop_constants_are_freed_before_the_vae_decode(monkeypatch):
    # gpu.tools.plan sizes the decode phase as the VAE alone: the reference stream and the context
    # (GBs at 720p) must be dead by then.
    import weakref

    pipe = build_tiny_pipeline(seed=0)
    made: list[weakref.ref] = []
    for name in ("prepare_reference", "prepare_context"):
        original = getattr(pipe.transformer, name)

        def recording(*args, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            made.append(weakref.ref(out))
            return out

        monkeypatch.setattr(pipe.transformer, name, recording)
    alive_at_decode: list[int] = []
    decode = pipe.vae.decode

    def checking_decode(*args, **kwargs):
        alive_at_decode.append(sum(r() is not None for r in made))
        return decode(*args, **kwargs)

    monkeypatch.setattr(pipe.vae, "decode", checking_decode)
    _generate(pipe)
    assert len(made) == 2 and alive_at_decode == [0]


def test_encoders_live_on_the_host_between_videos():
    from gpu.vap.offload import HostResident

    pipe = build_tiny_pipeline(seed=0)
    encoder = HostResident(pipe.text_encoder, pin=False)
    before = {n: p.data_ptr() for n, p in pipe.text_encoder.named_parameters()}
    with encoder.on("meta") as lent:  # any non-host device: the weights are copied there
        assert {p.device.type for p in lent.parameters()} == {"meta"}
    # Afterwards only the original host tensors remain: nothing was copied back.
    assert {n: p.data_ptr() for n, p in pipe.text_encoder.named_parameters()} == before
    assert encoder.nbytes == sum(p.numel() * 4 for p in pipe.text_encoder.parameters())


def test_pipeline_with_encoder_offload_gives_the_same_video():
    kwargs = _latent_kwargs(steps=2)
    plain = build_tiny_pipeline(seed=0)
    offloaded = build_tiny_pipeline(seed=0)
    offloaded.enable_encoder_offload()
    offloaded.to(torch.float32)  # moving the pipeline keeps the encoders host-resident
    assert offloaded.encoders_offloaded and not plain.encoders_offloaded
    for encoder in offloaded._host_encoders:
        module_params = {id(p) for p in encoder.module.parameters()}
        assert module_params <= {id(t) for *_, t in encoder._slots}
    a = plain(**kwargs, generator=torch.Generator().manual_seed(3)).frames
    b = offloaded(**kwargs, generator=torch.Generator().manual_seed(3)).frames
    assert torch.equal(a, b)


def test_rotary_in_pieces_is_bit_identical(monkeypatch):
    from gpu.vap import rotary

    x = torch.randn(2, 50, 3, 24, dtype=torch.bfloat16)
    cos, sin = rotary_tables(24, (2, 5, 5))
    monkeypatch.setattr(rotary, "ROTARY_PIECES", 1)
    whole = rotary.apply_rotary(x, cos, sin)
    monkeypatch.setattr(rotary, "ROTARY_PIECES", 7)
    assert torch.equal(rotary.apply_rotary(x, cos, sin), whole)


def test_blocks_trace_whole_for_regional_compile():
    # fullgraph=True: no graph break in either block type with the per-video inputs as arguments
    # (dynamo's "eager" backend checks the tracing without a C++ compiler).
    model = build_tiny_transformer(0).eval()
    raw = _inputs(2, seed=8)
    latents, t = raw["hidden_states"][:1].expand(2, -1, -1, -1, -1), torch.tensor(500).expand(2)
    with torch.no_grad():
        ref = model.prepare_reference(
            raw["hidden_states_mot_ref"],
            raw["encoder_hidden_states_mot_ref"],
            raw["encoder_hidden_states_image_mot_ref"],
        )
        ctx = model.prepare_context(raw["encoder_hidden_states"], raw["encoder_hidden_states_image"])
        eager = model(latents, t, reference=ref, context=ctx, return_dict=False)[0]
        model.compile_repeated_blocks(fullgraph=True, backend="eager")
        try:
            compiled = model(latents, t, reference=ref, context=ctx, return_dict=False)[0]
        finally:
            torch._dynamo.reset()
    assert torch.equal(compiled, eager)
