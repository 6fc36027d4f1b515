"""Resumable denoising: the state between two steps, as bytes a re-run can continue from.

A preempted GPU input runs again on a fresh container. What the denoising loop carries from one
step to the next is small: the latents and the scheduler's multistep memory (UniPC: the converted
model outputs of the last `solver_order` steps, the sample its corrector starts from, the order it
used last, the warm-up counter and the step index). Everything else a step reads is recomputed
identically by the re-run from the job's inputs (text and image encodings, VAE conditions, the
schedule), and no step draws random numbers (UniPC is deterministic; the generator draws the
initial noise only). So a re-run that recomputes the constants, restores this state and continues
at the saved step produces the same latents, bit for bit, as a run that was never stopped (on the
same kind of device with the same software: the state is refused when what it can check differs).

Format (version 1): `MAGIC`, the SHA-256 of the rest, then a safetensors payload whose metadata
says the format version, the run's fingerprint (`fingerprint`: the caller's job key, the call's
settings, the scheduler's config, the diffusers version and the initial noise), the steps done and
the steps in all. A state that is damaged, of another version, job, settings or step count is
refused with a one-line reason (`ResumeRefused`); the pipeline then starts from step 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import diffusers
import torch
from diffusers.schedulers import UniPCMultistepScheduler
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

MAGIC = b"VAP-DENOISE-STATE\n"
FORMAT_VERSION = 1
MAX_EVERY_S = 60.0  # a preemption never costs more than about a minute of denoising
DEFAULT_EVERY_S = 30.0
_DIGEST = 32
_LATENTS = "latents"
_SCHED = "scheduler."

log = logging.getLogger(__name__)


class ResumeRefused(ValueError):
    """A saved state this run must not continue from; the message says why, in one line."""


@dataclass(frozen=True)
class RunIdentity:
    """What a saved state must match to be resumed by this run."""

    fingerprint: str
    total_steps: int
    latent_shape: tuple[int, ...]


@dataclass(frozen=True)
class SaveRecord:
    """One save: after how many steps; its size; the time the loop waited (for the save before,
    if it was still running, and for the host copy); the time serialising took and the time
    `save` took (both in the background); the error `save` raised, if any (a failed save costs
    resumability, never the job)."""

    steps_done: int
    bytes: int
    blocked_s: float
    encode_s: float
    sink_s: float
    error: str | None = None


@dataclass
class Resumable:
    """How one pipeline call saves its denoising state, and the state it may continue from.

    `key` names the job (the same for every attempt of it, e.g. its id and the weights' revision);
    `save` receives each new state (the latest replaces the ones before; it runs on a background
    thread, one save at a time); `saved` is the last state an earlier attempt saved, if any. A
    state is taken after a step once `every_s` seconds of `clock` have passed since the loop
    started or since the last one was taken (if the save before is still running then, the loop
    waits for it: saves land where the clock puts them). The pipeline fills in `resumed_at`
    (steps already done when the loop started), `refused` (why `saved` was not used) and
    `saves`."""

    key: str
    save: Callable[[bytes], None]
    saved: bytes | None = None
    every_s: float = DEFAULT_EVERY_S
    clock: Callable[[], float] = time.monotonic
    resumed_at: int = 0
    refused: str | None = None
    saves: list[SaveRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.key:
            raise ValueError("a resumable run needs a key naming its job")
        if not 0 < self.every_s <= MAX_EVERY_S:
            raise ValueError(f"every_s must be in (0, {MAX_EVERY_S:g}] seconds, got {self.every_s}")


@dataclass(frozen=True)
class DenoiseState:
    """A validated saved state (tensors on the CPU)."""

    steps_done: int
    latents: torch.Tensor
    scheduler_tensors: dict[str, torch.Tensor]
    scheduler_meta: dict[str, Any]


def check_supported(scheduler: Any) -> None:
    """Resuming is implemented for the scheduler the model ships with; anything else is an error
    at the start of a call, never a silently wrong continuation."""
    if type(scheduler) is not UniPCMultistepScheduler:
        raise ValueError(
            f"resumable denoising supports UniPCMultistepScheduler, not {type(scheduler).__name__}"
        )
    if getattr(scheduler, "solver_p", None) is not None:
        raise ValueError("resumable denoising does not support UniPC with a solver_p")


def fingerprint(key: str, settings: Mapping[str, Any], scheduler: Any, initial_noise: torch.Tensor) -> str:
    """SHA-256 over the job key, the call's settings, the scheduler and the initial noise."""
    described = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "settings": dict(settings),
        "scheduler": type(scheduler).__name__,
        "scheduler_config": dict(scheduler.config),
        "diffusers": diffusers.__version__,
        "noise": [list(initial_noise.shape), str(initial_noise.dtype)],
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode())
    digest.update(initial_noise.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# -- the scheduler's memory (UniPC) ----------------------------------------------------------------
def _capture_scheduler(s: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {f"{_SCHED}timesteps": s.timesteps, f"{_SCHED}sigmas": s.sigmas}
    if s.last_sample is not None:
        tensors[f"{_SCHED}last_sample"] = s.last_sample
    for j, output in enumerate(s.model_outputs):
        if output is not None:
            tensors[f"{_SCHED}model_outputs.{j}"] = output
    meta = {
        "class": type(s).__name__,
        "solver_order": int(s.config.solver_order),
        "step_index": s.step_index,
        "begin_index": s.begin_index,
        "lower_order_nums": int(s.lower_order_nums),
        "this_order": getattr(s, "this_order", None),
        "model_outputs": [output is not None for output in s.model_outputs],
        # Only the last entry is read (by a solver_p, which is refused); all are kept anyway.
        "timestep_list": [None if t is None else int(t) for t in s.timestep_list],
    }
    return tensors, meta


def _restore_scheduler(s: Any, state: DenoiseState, device: torch.device) -> None:
    """Put the saved memory into `s`, on which `set_timesteps` has just run for this call."""
    meta, tensors = state.scheduler_meta, state.scheduler_tensors
    if meta.get("class") != type(s).__name__ or meta.get("solver_order") != s.config.solver_order:
        raise ResumeRefused(f"saved for a {meta.get('class')} of order {meta.get('solver_order')}")
    for name, ours in (("timesteps", s.timesteps), ("sigmas", s.sigmas)):
        saved = tensors.get(f"{_SCHED}{name}")
        if saved is None or not torch.equal(saved, ours.to("cpu")):
            raise ResumeRefused(f"the saved schedule's {name} differ from this run's")
    present = meta.get("model_outputs")
    if not isinstance(present, list) or len(present) != s.config.solver_order:
        raise ResumeRefused("the saved scheduler state has no model-output list of the solver's order")
    if meta.get("step_index") != state.steps_done:
        raise ResumeRefused(
            f"the scheduler's step {meta.get('step_index')} is not the {state.steps_done} saved"
        )
    outputs: list[torch.Tensor | None] = []
    for j, there in enumerate(present):
        name = f"{_SCHED}model_outputs.{j}"
        if there != (name in tensors):
            raise ResumeRefused(f"the saved scheduler state lacks {name}")
        outputs.append(tensors[name].to(device) if there else None)
    last = tensors.get(f"{_SCHED}last_sample")
    try:  # read everything before changing anything: a refused state leaves `s` as it was
        timestep_list = [
            None if t is None else torch.tensor(int(t), dtype=s.timesteps.dtype, device=s.timesteps.device)
            for t in meta["timestep_list"]
        ]
        lower_order_nums = int(meta["lower_order_nums"])
        this_order = None if meta["this_order"] is None else int(meta["this_order"])
        begin_index = None if meta["begin_index"] is None else int(meta["begin_index"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ResumeRefused(f"the saved scheduler state is unreadable ({exc!r})") from None
    if len(timestep_list) != s.config.solver_order:
        raise ResumeRefused("the saved scheduler state has no timestep list of the solver's order")
    s.model_outputs = outputs
    s.timestep_list = timestep_list
    s.lower_order_nums = lower_order_nums
    if this_order is not None:
        s.this_order = this_order
    s.last_sample = None if last is None else last.to(device)
    s._step_index = state.steps_done
    s._begin_index = begin_index


# -- bytes ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    """The state after `steps_done` steps, copied to the host: what the loop waits for."""

    steps_done: int
    tensors: dict[str, torch.Tensor]
    scheduler_meta: dict[str, Any]


def snapshot(steps_done: int, latents: torch.Tensor, scheduler: Any) -> Snapshot:
    sched_tensors, sched_meta = _capture_scheduler(scheduler)
    tensors = {_LATENTS: latents, **sched_tensors}
    # Own host copies: the loop moves on while they are serialised, and safetensors refuses
    # tensors that share memory.
    host = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    return Snapshot(steps_done, host, sched_meta)


def encode_snapshot(identity: RunIdentity, snap: Snapshot) -> bytes:
    metadata = {
        "format_version": str(FORMAT_VERSION),
        "fingerprint": identity.fingerprint,
        "steps_done": str(snap.steps_done),
        "total_steps": str(identity.total_steps),
        "scheduler": json.dumps(snap.scheduler_meta),
    }
    payload = save_tensors(snap.tensors, metadata=metadata)
    return MAGIC + hashlib.sha256(payload).digest() + payload


def encode_state(identity: RunIdentity, steps_done: int, latents: torch.Tensor, scheduler: Any) -> bytes:
    """The state after `steps_done` steps, as bytes."""
    return encode_snapshot(identity, snapshot(steps_done, latents, scheduler))


class BackgroundSaver:
    """Serialises and hands over snapshots on a background thread, one at a time, so the loop
    waits for the host copy only. `close` waits for the save in flight (a real preemption does
    not wait: the state saved before it is the one a re-run finds)."""

    def __init__(self, resume: Resumable, identity: RunIdentity) -> None:
        self._resume = resume
        self._identity = identity
        self._thread: threading.Thread | None = None

    def save(self, steps_done: int, latents: torch.Tensor, scheduler: Any) -> None:
        """Take a snapshot (after the save before has finished) and save it in the background."""
        began = time.perf_counter()
        self.close()
        snap = snapshot(steps_done, latents, scheduler)
        blocked_s = time.perf_counter() - began
        self._thread = threading.Thread(target=self._save, args=(snap, blocked_s), name="vap-state-save")
        self._thread.start()

    def _save(self, snap: Snapshot, blocked_s: float) -> None:
        began = time.perf_counter()
        data = encode_snapshot(self._identity, snap)
        encoded = time.perf_counter()
        error = None
        try:
            self._resume.save(data)
        except Exception as exc:  # a failed save costs resumability, never the job
            error = f"{type(exc).__name__}: {exc}"
            log.warning("saving the denoising state after %d steps failed: %s", snap.steps_done, error)
        done = time.perf_counter()
        record = SaveRecord(snap.steps_done, len(data), blocked_s, encoded - began, done - encoded, error)
        self._resume.saves.append(record)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _metadata(payload: bytes) -> dict[str, str]:
    # safetensors: 8-byte little-endian header length, then the JSON header (with __metadata__).
    size = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + size])
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        raise ValueError("no metadata")
    return {str(k): str(v) for k, v in meta.items()}


def decode_state(data: bytes, identity: RunIdentity) -> DenoiseState:
    """The saved state in `data` if this run may continue from it; `ResumeRefused` otherwise."""
    if not data.startswith(MAGIC):
        raise ResumeRefused("not a saved denoising state (no magic)")
    digest, payload = data[len(MAGIC) : len(MAGIC) + _DIGEST], data[len(MAGIC) + _DIGEST :]
    if hashlib.sha256(payload).digest() != digest:
        raise ResumeRefused("the saved state is damaged (checksum mismatch)")
    try:
        meta = _metadata(payload)
        version = int(meta.get("format_version", "0"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ResumeRefused(f"the saved state is unreadable ({exc})") from None
    if version != FORMAT_VERSION:
        raise ResumeRefused(f"saved in format version {version}; this code reads {FORMAT_VERSION}")
    try:
        total, done = int(meta["total_steps"]), int(meta["steps_done"])
    except (KeyError, ValueError) as exc:
        raise ResumeRefused(f"the saved state is unreadable ({exc!r})") from None
    if total != identity.total_steps:
        raise ResumeRefused(f"saved for {total} steps; this run has {identity.total_steps}")
    if meta.get("fingerprint") != identity.fingerprint:
        raise ResumeRefused("saved by another job or with other settings (fingerprint differs)")
    try:
        sched_meta = json.loads(meta["scheduler"])
        tensors = load_tensors(payload)
    except (KeyError, ValueError) as exc:
        raise ResumeRefused(f"the saved state is unreadable ({exc!r})") from None
    if not 1 <= done <= total:
        raise ResumeRefused(f"saved after {done} of {total} steps")
    latents = tensors.pop(_LATENTS, None)
    if latents is None or tuple(latents.shape) != identity.latent_shape or latents.dtype != torch.float32:
        got = None if latents is None else (tuple(latents.shape), latents.dtype)
        raise ResumeRefused(f"the saved latents are {got}, expected {identity.latent_shape} float32")
    if not isinstance(sched_meta, dict):
        raise ResumeRefused("the saved scheduler state is unreadable")
    return DenoiseState(done, latents, tensors, sched_meta)


def restore(state: DenoiseState, scheduler: Any, device: torch.device) -> torch.Tensor:
    """Put `state` into `scheduler` (after this call's `set_timesteps`); the latents on `device`."""
    _restore_scheduler(scheduler, state, device)
    return state.latents.to(device)
