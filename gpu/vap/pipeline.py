"""Image-to-video VAP pipeline: target image + reference video (+ captions) -> video frames.

Follows the reference pipeline's math (4 prompt encodings, CLIP of the target image and the first
reference frame, VAE encodings of the target condition, the reference video and the reference
condition, CFG, UniPC flow schedule of the reference fork), batched where that leaves the math
unchanged: CFG runs as ONE transformer call of batch 2, the reference stream is embedded once.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import regex as re
import torch
from diffusers.models import AutoencoderKLWan
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers import UniPCMultistepScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from gpu.vap.geometry import TEXT_TOKENS, Geometry
from gpu.vap.offload import HostResident
from gpu.vap.resume import (
    BackgroundSaver,
    Resumable,
    ResumeRefused,
    RunIdentity,
    check_supported,
    decode_state,
    fingerprint,
    restore,
)
from gpu.vap.transformer import WanTransformer3DMOTModel

log = logging.getLogger(__name__)

# The reference's default negative prompt (used for both streams when none is given).
DEFAULT_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, "
    "static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra "
    "fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused "
    "fingers, still picture, messy background, three legs, many people in the background, walking "
    "backwards"
)

StepCallback = Callable[[Any, int, torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]


@dataclass
class VAPPipelineOutput(BaseOutput):
    frames: Any  # np.ndarray float32 [1, F, H, W, 3] in [0, 1] for output_type="np"


def prompt_clean(text: str) -> str:
    """The reference's caption cleaning: ftfy, double HTML unescape, whitespace collapse."""
    import ftfy  # imported here so that importing the module stays light

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def reference_flow_sigmas(num_steps: int, num_train_timesteps: int) -> np.ndarray:
    """Unshifted sigmas of the reference fork's UniPC flow schedule (1 - linspace, reversed).

    diffusers 0.42.1 builds `linspace(1, 1/N, n+1)` instead, which gives other timesteps
    (999, 993, ... vs the fork's 999, 992, ...); passing these reproduces the fork exactly."""
    alphas = np.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1)
    return np.flip(1.0 - alphas)[:-1].copy()


def even_indices(length: int, count: int) -> list[int]:
    """The reference's even frame sampling: `linspace(0, length-1, count)` truncated."""
    return [int(i) for i in torch.linspace(0, length - 1, count).long().tolist()]


class VAPPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->image_encoder->transformer->vae"  # type: ignore[assignment]
    _callback_tensor_inputs = ["latents"]  # noqa: RUF012

    transformer: WanTransformer3DMOTModel
    vae: AutoencoderKLWan
    scheduler: Any
    text_encoder: Any
    tokenizer: Any
    image_encoder: Any
    image_processor: Any

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Any,
        image_encoder: Any,
        image_processor: Any,
        transformer: WanTransformer3DMOTModel,
        vae: AutoencoderKLWan,
        scheduler: Any,
    ) -> None:
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            image_encoder=image_encoder,
            image_processor=image_processor,
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,
        )
        # Latent and token shapes, read once from the configs (diffusers' names for the factors).
        self.geometry = Geometry.of(vae.config, transformer.config)
        self.vae_scale_factor_temporal = self.geometry.temporal
        self.vae_scale_factor_spatial = self.geometry.spatial
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)
        self._interrupt = False
        self._host_encoders: list[HostResident] = []

    def enable_encoder_offload(self) -> None:
        """Keep the text and image encoders in host memory between videos: they are copied to the
        GPU for the encode step only, so the denoising loop has their ~14 GB (UMT5-XXL + CLIP).
        Costs one host-to-GPU copy per video (pinned memory, well under a second on an H100).
        Calling it again re-homes the encoders (`to()` does, after moving the rest)."""
        self._host_encoders = [HostResident(self.text_encoder), HostResident(self.image_encoder)]

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """`DiffusionPipeline.to`; encoders kept in host memory are put back there afterwards."""
        out = super().to(*args, **kwargs)
        if self._host_encoders:
            self.enable_encoder_offload()
        return out

    @property
    def encoders_offloaded(self) -> bool:
        return bool(self._host_encoders)

    @contextmanager
    def _encoders_on(self, device: torch.device) -> Iterator[None]:
        with ExitStack() as stack:
            for encoder in self._host_encoders:
                stack.enter_context(encoder.on(device))
            yield

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # -- encoders ---------------------------------------------------------------------------
    def encode_text(self, captions: Sequence[str], max_sequence_length: int = TEXT_TOKENS) -> torch.Tensor:
        """UMT5 states, zeroed after each caption's last token (as the reference): [N, L, text_dim]."""
        device = self._execution_device
        tokens = self.tokenizer(
            [prompt_clean(c) for c in captions],
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(device)
        states = self.text_encoder(tokens.input_ids.to(device), mask).last_hidden_state
        return states.masked_fill(~mask.bool()[..., None], 0.0)

    def encode_images(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        """CLIP penultimate hidden states (what Wan I2V conditions on): [N, 257, image_dim]."""
        device = self._execution_device
        pixels = self.image_processor(images=list(images), return_tensors="pt").pixel_values
        pixels = pixels.to(device=device, dtype=self.image_encoder.dtype)
        return self.image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Per-channel mean and 1/std of the VAE latents, shaped to broadcast over [B, C, F, H, W].
        cfg = self.vae.config
        mean = torch.tensor(cfg["latents_mean"]).view(1, -1, 1, 1, 1).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(cfg["latents_std"]).view(1, -1, 1, 1, 1).to(like.device, like.dtype)
        return mean, inv_std

    def _normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        mean, inv_std = self._latent_stats(latents)
        return (latents - mean) * inv_std

    def _denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        mean, inv_std = self._latent_stats(latents)
        return latents / inv_std + mean

    def _vae_mode(self, video: torch.Tensor) -> torch.Tensor:
        video = video.to(device=self._execution_device, dtype=self.vae.dtype)
        return self._normalize_latents(self.vae.encode(video).latent_dist.mode().float())

    def encode_conditions(
        self, image: PIL.Image.Image, ref_video: Sequence[PIL.Image.Image], height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(target condition, reference stream input): each [1, 20 or 36, F_lat, h, w], float32.

        Target: 4-channel first-frame mask + latents of (image, zero frames). Reference: its video
        latents + the same mask + latents of (first reference frame, zero frames)."""
        frames = len(ref_video)
        target = self.video_processor.preprocess(image, height=height, width=width).float()
        first = self.video_processor.preprocess(ref_video[0], height=height, width=width).float()
        video = self.video_processor.preprocess_video(list(ref_video), height=height, width=width).float()

        def condition_video(still: torch.Tensor) -> torch.Tensor:
            zeros = still.new_zeros(still.shape[0], still.shape[1], frames - 1, height, width)
            return torch.cat([still.unsqueeze(2), zeros], dim=2)

        target_lat = self._vae_mode(condition_video(target))
        ref_cond_lat = self._vae_mode(condition_video(first))
        ref_lat = self._vae_mode(video)

        mask = torch.zeros_like(target_lat[:, :4])
        mask[:, :, 0] = 1.0  # only the first frame (the given image) is known
        return (
            torch.cat([mask, target_lat], dim=1),
            torch.cat([ref_lat, mask, ref_cond_lat], dim=1),
        )

    def _set_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        device = self._execution_device
        sched: Any = self.scheduler
        is_unipc = isinstance(sched, UniPCMultistepScheduler)  # (a variable: keeps `sched` Any for mypy)
        if is_unipc and sched.config.use_flow_sigmas:
            sigmas = reference_flow_sigmas(num_inference_steps, sched.config.num_train_timesteps)
            sched.set_timesteps(device=device, sigmas=sigmas)
        else:
            sched.set_timesteps(num_inference_steps, device=device)
        return sched.timesteps

    # -- generation -------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        image: PIL.Image.Image,
        ref_video: Sequence[PIL.Image.Image],
        prompt: str,
        prompt_mot_ref: str,
        negative_prompt: str | None = None,
        negative_prompt_mot_ref: str | None = None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 49,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        generator: torch.Generator | None = None,
        output_type: str = "np",
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int = TEXT_TOKENS,
        latents: torch.Tensor | None = None,
        return_dict: bool = True,
        resume: Resumable | None = None,
    ) -> VAPPipelineOutput | tuple[Any]:
        """Generate a video. With `resume`, the denoising state is saved every so often and a state
        saved by an earlier attempt of the same job is continued (`gpu.vap.resume`)."""
        self._check(prompt, prompt_mot_ref, height, width, num_frames, max_sequence_length)
        if len(ref_video) == 0:
            raise ValueError("ref_video has no frames")
        if len(ref_video) != num_frames:
            ref_video = [ref_video[i] for i in even_indices(len(ref_video), num_frames)]
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback tensor inputs {bad} not in {self._callback_tensor_inputs}")
        if resume is not None:
            check_supported(self.scheduler)
        self._interrupt = False
        device = self._execution_device
        cfg = guidance_scale > 1.0
        tdtype = self.transformer.dtype

        # 1. Text (one encoder batch) and CLIP (target image, first reference frame).
        neg = DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
        neg_ref = DEFAULT_NEGATIVE_PROMPT if negative_prompt_mot_ref is None else negative_prompt_mot_ref
        captions = [prompt, neg, prompt_mot_ref, neg_ref] if cfg else [prompt, prompt_mot_ref]
        with self._encoders_on(device):
            text = self.encode_text(captions, max_sequence_length).to(tdtype)
            clip = self.encode_images([image, ref_video[0]]).to(tdtype)
        n = 2 if cfg else 1
        text_main, text_ref = text[:n], text[n:]  # each [cond, (uncond)]
        clip_main = clip[:1].expand(n, -1, -1)
        clip_ref = clip[1:].expand(n, -1, -1)

        # 2. VAE conditions and the reference stream (constant over the loop).
        condition, ref_input = self.encode_conditions(image, ref_video, height, width)
        reference = self.transformer.prepare_reference(ref_input.to(tdtype), text_ref, clip_ref)
        context = self.transformer.prepare_context(text_main, clip_main)
        del text, text_main, text_ref, clip, clip_main, clip_ref, ref_input  # all in the contexts now

        # 3. Noise and schedule.
        timesteps = self._set_timesteps(num_inference_steps)
        shape = (1, self.vae.config["z_dim"], *condition.shape[2:])
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            latents = latents.to(device=device, dtype=torch.float32)
        self._num_timesteps = len(timesteps)
        saver = None
        start = 0
        if resume is not None:
            settings = {
                "captions": captions,
                "size": [height, width, num_frames],
                "steps": num_inference_steps,
                "guidance_scale": guidance_scale,
                "transformer": dict(self.transformer.config),
            }
            identity = RunIdentity(
                fingerprint(resume.key, settings, self.scheduler, latents),
                len(timesteps),
                tuple(latents.shape),
            )
            start, latents = self._resume(resume, identity, latents)
            saver = BackgroundSaver(resume, identity)
            last_save = resume.clock()

        # 4. Denoising loop: cond and uncond in ONE batch of 2.
        try:
            for i in range(start, len(timesteps)):
                t = timesteps[i]
                if self._interrupt:
                    break
                model_in = torch.cat([latents, condition], dim=1).to(tdtype)
                # `expand`: the CFG rows are views of one row, which the transformer computes once
                # up to the first cross-attention.
                pred = self.transformer(
                    model_in.expand(n, -1, -1, -1, -1),
                    t.expand(n),
                    reference=reference,
                    context=context,
                    return_dict=False,
                )[0]
                if cfg:
                    cond, uncond = pred.chunk(2)
                    pred = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(pred, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    local = {"latents": latents}
                    outputs = callback_on_step_end(
                        self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs}
                    )
                    if outputs:
                        latents = outputs.pop("latents", latents)
                if saver is not None and resume is not None:
                    now = resume.clock()
                    if now - last_save >= resume.every_s:
                        saver.save(i + 1, latents, self.scheduler)
                        last_save = now
        finally:
            if saver is not None:
                saver.close()

        # The loop's constants are dead: free them (GBs at 720p) before the VAE decode's peak.
        del reference, context, condition
        if output_type == "latent":
            video: Any = latents
        else:
            z = self._denormalize_latents(latents.to(self.vae.dtype))
            decoded = self.vae.decode(z, return_dict=False)[0]
            video = self.video_processor.postprocess_video(decoded.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return VAPPipelineOutput(frames=video)

    def _resume(
        self, resume: Resumable, identity: RunIdentity, latents: torch.Tensor
    ) -> tuple[int, torch.Tensor]:
        """(steps already done, latents to continue from): the saved state's, or (0, `latents`)
        when there is none or it is refused (then the scheduler is as `set_timesteps` left it)."""
        resume.resumed_at, resume.refused = 0, None
        if resume.saved is None:
            return 0, latents
        try:
            state = decode_state(resume.saved, identity)
            restored = restore(state, self.scheduler, latents.device)
        except ResumeRefused as refused:
            resume.refused = str(refused)
            log.warning("not resuming the saved denoising state: %s", refused)
            return 0, latents
        resume.resumed_at = state.steps_done
        return state.steps_done, restored

    def _check(
        self, prompt: Any, prompt_mot_ref: Any, height: int, width: int, num_frames: int, max_len: int
    ) -> None:
        # Strings only: the reference iterates a bare string char by char; we take one caption.
        if not isinstance(prompt, str) or not isinstance(prompt_mot_ref, str):
            raise TypeError("prompt and prompt_mot_ref must each be one caption (str)")
        if height % 16 or width % 16:
            raise ValueError(f"height and width must be multiples of 16, got {height}x{width}")
        if num_frames < 1 or (num_frames - 1) % self.vae_scale_factor_temporal:
            raise ValueError(f"num_frames must be 4k+1, got {num_frames}")
        if max_len != TEXT_TOKENS:
            raise ValueError("max_sequence_length must be 512 (the attention assumes 512 text tokens)")
