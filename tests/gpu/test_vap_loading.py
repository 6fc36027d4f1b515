"""Loading the checkpoint layout strictly: save the tiny pipeline, load it through load_pipeline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import re

import pytest
import safetensors.torch as st
import torch

from gpu.vap.loading import VAP_REVISION, CheckpointMismatch, is_commit, load_pipeline, load_transformer
from gpu.vap.tiny import build_tiny_pipeline, build_tiny_transformer
from gpu.vap.transformer import KEEP_IN_FP32

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("vap_tiny")
    pipe = build_tiny_pipeline(seed=0)
    pipe.save_pretrained(path)
    return path, pipe


def test_the_weights_pin_is_a_commit_or_nothing_never_a_branch():
    # Unknown here (docs/model.md): None makes every hub load ask for an explicit commit.
    assert VAP_REVISION is None or re.fullmatch(r"[0-9a-f]{40}", VAP_REVISION)
    assert is_commit("0f30aedfc09c698d9b2ffc0d70d608a7f22d8403")
    for moving in ("main", "v1.0", "refs/pr/1", "f0d6ab47", "0F30AEDFC09C698D9B2FFC0D70D608A7F22D8403", None):
        assert not is_commit(moving)


def test_a_hub_repo_without_a_pinned_commit_is_refused(monkeypatch):
    import gpu.vap.loading as loading

    monkeypatch.setattr(loading, "snapshot_download", lambda *a, **k: pytest.fail("downloaded unpinned"))
    for revision in (None, "main"):
        with pytest.raises(ValueError, match="pinned commit"):
            load_pipeline(loading.VAP_REPO_ID, device="cpu", revision=revision)


def test_roundtrip_through_load_pipeline(saved):
    path, pipe = saved
    loaded = load_pipeline(str(path), device="cpu", dtype=torch.float32)
    a, b = pipe.transformer.state_dict(), loaded.transformer.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert type(loaded.scheduler) is type(pipe.scheduler)
    assert loaded.scheduler.config.flow_shift == pipe.scheduler.config.flow_shift
    assert type(loaded.image_processor).__name__ == "CLIPImageProcessorPil"


def test_bf16_load_keeps_reference_fp32_tensors(saved):
    path, _ = saved
    model = load_transformer(str(path), torch.bfloat16)
    for name, tensor in model.state_dict().items():
        keep = any(part in KEEP_IN_FP32 for part in name.split("."))
        assert tensor.dtype == (torch.float32 if keep else torch.bfloat16), name
    # Exact-name matching: the expert's twins load in the model dtype, as in the reference.
    assert model.blocks[0].scale_shift_table_mot_ref.dtype == torch.bfloat16


def _corrupt(tmp_path, edit) -> str:
    model = build_tiny_transformer(0)
    model.save_pretrained(tmp_path / "transformer")
    file = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = st.load_file(str(file))
    edit(sd)
    st.save_file(sd, str(file))
    return str(tmp_path)


def test_missing_key_fails(tmp_path):
    path = _corrupt(tmp_path, lambda sd: sd.pop("blocks.0.attn1_mot_ref.to_q.weight"))
    with pytest.raises(CheckpointMismatch, match="missing_keys"):
        load_transformer(path, torch.float32)


def test_extra_key_fails(tmp_path):
    def add(sd):
        sd["blocks.2.attn1_mot_ref.to_q.weight"] = torch.zeros(24, 24)

    with pytest.raises(CheckpointMismatch, match="unexpected_keys"):
        load_transformer(_corrupt(tmp_path, add), torch.float32)


def test_wrong_shape_fails(tmp_path):
    def reshape(sd):
        sd["blocks.0.ffn_mot_ref.net.2.bias"] = torch.zeros(25)

    with pytest.raises(CheckpointMismatch, match="mismatched_shapes"):
        load_transformer(_corrupt(tmp_path, reshape), torch.float32)


def test_hub_repo_is_fetched_at_the_pinned_revision(saved, monkeypatch):
    import gpu.vap.loading as loading

    path, _ = saved
    calls = []

    def fake_snapshot_download(repo_id, revision):
        calls.append((repo_id, revision))
        return str(path)

    monkeypatch.setattr(loading, "snapshot_download", fake_snapshot_download)
    commit = "0123456789abcdef0123456789abcdef01234567"
    load_pipeline(loading.VAP_REPO_ID, device="cpu", dtype=torch.float32, revision=commit)
    assert calls == [("ByteDance/Video-As-Prompt-Wan2.1-14B", commit)]


def test_attention_backend_probe():
    from gpu.vap.attention import backend_works

    cpu = torch.device("cpu")
    assert backend_works("native", cpu, torch.float32)
    assert not backend_works("flash", cpu)  # flash-attn is not installed / not a CPU kernel
    assert not backend_works("no-such-backend", cpu)


def test_unusable_backend_falls_back_to_sdpa(saved):
    path, _ = saved
    pipe = load_pipeline(str(path), device="cpu", dtype=torch.float32, attention_backend="flash")
    processors = pipe.transformer.attn_processors.values()
    backends = {getattr(p, "_attention_backend", None) for p in processors}
    assert backends == {None}


def test_memory_options_reach_the_pipeline(saved):
    path, _ = saved
    pipe = load_pipeline(str(path), device="cpu", dtype=torch.float32, offload_encoders=True, vae_tiling=True)
    assert pipe.encoders_offloaded and pipe.vae.use_tiling
    assert not load_pipeline(str(path), device="cpu", dtype=torch.float32).encoders_offloaded
