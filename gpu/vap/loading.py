"""Load the released VAP checkpoint (diffusers layout) into `VAPPipeline`, strictly.

The released `model_index.json` names the reference fork's classes (`WanImageToVideoMOTPipeline`,
`WanTransformer3DMOTModel`), which stock diffusers cannot resolve, so each component is loaded
from its subfolder here. The transformer must match key for key: any missing, unexpected or
mis-shaped tensor is an error, not a warning.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers.models import AutoencoderKLWan
from huggingface_hub import snapshot_download
from safetensors import safe_open
from transformers import AutoTokenizer, CLIPVisionModel, UMT5EncoderModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from gpu.vap import compiling
from gpu.vap.attention import choose_backend
from gpu.vap.pipeline import VAPPipeline
from gpu.vap.transformer import WanTransformer3DMOTModel

VAP_REPO_ID = "ByteDance/Video-As-Prompt-Wan2.1-14B"  # self-contained: Wan2.1-I2V-14B's parts included
# The commit of VAP_REPO_ID to load. Unknown here: its full 40-hex id could not be looked up from
# this environment (a third-party record names the 65.87 GB snapshot by its short hash `f0d6ab47`
# only), and a branch name is no pin. None: every hub load needs an explicit commit (a deployment
# sets `VAP_REVISION`); set this constant once the commit is known.
VAP_REVISION: str | None = None
_COMMIT = re.compile(r"[0-9a-f]{40}")


def is_commit(revision: str | None) -> bool:
    """Whether `revision` names one commit (40 hex digits), not a branch or tag that can move."""
    return revision is not None and _COMMIT.fullmatch(revision) is not None


def require_commit(repo: str, revision: str | None) -> str:
    if not is_commit(revision):
        raise ValueError(
            f"{repo} must be loaded at a pinned commit (40 hex digits), not {revision!r}: set VAP_REVISION"
        )
    assert revision is not None
    return revision


logger = logging.getLogger(__name__)


class CheckpointMismatch(RuntimeError):
    """The checkpoint's transformer tensors do not match this implementation's names/shapes."""


def checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers of a diffusers model folder (no data read)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointMismatch(f"no .safetensors files in {folder}")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def verify_transformer_checkpoint(folder: Path) -> None:
    """Strict names + shapes against this implementation built on the meta device from the
    checkpoint's own config: raises CheckpointMismatch listing every difference."""
    config = WanTransformer3DMOTModel.load_config(str(folder))
    with torch.device("meta"):
        model = WanTransformer3DMOTModel.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = checkpoint_shapes(folder)
    problems = {
        "missing_keys": sorted(expected.keys() - found.keys()),
        "unexpected_keys": sorted(found.keys() - expected.keys()),
        "mismatched_shapes": sorted(
            f"{k}: checkpoint {found[k]} vs model {v}"
            for k, v in expected.items()
            if k in found and found[k] != v
        ),
    }
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        raise CheckpointMismatch(f"transformer checkpoint does not match strictly: {problems}")


def load_transformer(
    folder: str,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
) -> WanTransformer3DMOTModel:
    """Transformer with strict key matching (fp32 kept where the reference keeps it), loaded
    straight onto `device` (no 42 GB detour through host memory). `folder` is a local pipeline
    folder (`load_pipeline` downloads a hub repo at its pinned commit first)."""
    verify_transformer_checkpoint(Path(folder) / "transformer")
    model, info = WanTransformer3DMOTModel.from_pretrained(
        folder,
        subfolder="transformer",
        torch_dtype=dtype,
        low_cpu_mem_usage=True,
        device_map={"": torch.device(device)},
        output_loading_info=True,
    )
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        raise CheckpointMismatch(f"transformer checkpoint does not match strictly: {problems}")
    return model.eval()


def _scheduler(folder: str) -> Any:
    # The scheduler class comes from the checkpoint (expected: UniPCMultistepScheduler, flow).
    config = diffusers.UniPCMultistepScheduler.load_config(folder, subfolder="scheduler")
    cls = getattr(diffusers, str(config["_class_name"]))
    return cls.from_config(config)


def load_pipeline(
    path_or_repo: str = VAP_REPO_ID,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    revision: str | None = VAP_REVISION,
    vae_dtype: torch.dtype | None = None,
    attention_backend: str | None = None,
    compile_blocks: bool = False,
    offload_encoders: bool = False,
    vae_tiling: bool = False,
) -> VAPPipeline:
    """The released checkpoint (local folder or hub repo at `revision`) on `device`.

    `dtype` is for the text encoder and transformer; the CLIP image encoder and the VAE stay
    float32 by default, as in the reference (they cost a few seconds per video; docs/model.md says
    why bf16 is not the default for the VAE). Hub loaders ignore `revision` for local folders.

    Memory (`gpu.tools.plan` says which jobs need what, per GPU): `offload_encoders` keeps UMT5 and CLIP
    in host memory except while they encode (≈14 GB more for the denoising loop, one host-to-GPU
    copy per video); `vae_tiling` decodes/encodes in spatial tiles (lower VAE peak; tile seams are
    blended, so frames are not bit-identical to untiled decoding)."""
    device = torch.device(device)
    vae_dtype = vae_dtype or torch.float32
    if not os.path.isdir(path_or_repo):
        # Resolve the pinned snapshot once; every component then loads from local files.
        path_or_repo = snapshot_download(path_or_repo, revision=require_commit(path_or_repo, revision))
    tokenizer = AutoTokenizer.from_pretrained(path_or_repo, subfolder="tokenizer")
    # Straight to where it will live: the GPU, or host memory when it is lent only to encode.
    text_device = torch.device("cpu") if offload_encoders else device
    text_encoder = UMT5EncoderModel.from_pretrained(
        path_or_repo, subfolder="text_encoder", dtype=dtype, device_map={"": text_device}
    ).eval()
    image_encoder = CLIPVisionModel.from_pretrained(
        path_or_repo, subfolder="image_encoder", dtype=torch.float32
    ).eval()
    # PIL backend: the torchvision one's pixels differ from the reference's by up to 1.5e-2.
    image_processor = CLIPImageProcessorPil.from_pretrained(path_or_repo, subfolder="image_processor")
    vae = AutoencoderKLWan.from_pretrained(path_or_repo, subfolder="vae", torch_dtype=vae_dtype).eval()
    transformer = load_transformer(path_or_repo, dtype, device=device)
    pipe = VAPPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        image_encoder=image_encoder,
        image_processor=image_processor,
        transformer=transformer,
        vae=vae,
        scheduler=_scheduler(path_or_repo),
    )
    # Each component to its place (not pipe.to(device): offloaded encoders never visit the GPU).
    on_device: list[Any] = [pipe.vae, pipe.transformer]
    if offload_encoders:
        pipe.enable_encoder_offload()
    else:
        on_device += [pipe.text_encoder, pipe.image_encoder]
    for module in on_device:
        module.to(device)
    if vae_tiling:
        pipe.vae.enable_tiling()
    backend = choose_backend(device, dtype, forced=attention_backend)
    if backend != "native":
        pipe.transformer.set_attention_backend(backend)
    logger.info("attention backend on %s: %s", device, backend)
    if compile_blocks:
        # Regional compile (fuses the norm/modulation/rotary glue), sized for every accepted size,
        # and the default size compiled now rather than in the first job (gpu.vap.compiling).
        compiling.compile_blocks(pipe.transformer)
        compiling.warm_up(pipe.transformer, compiling.DEFAULT_SIZES)
    return pipe
