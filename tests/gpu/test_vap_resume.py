"""Resumable denoising with the tiny pipeline: a run stopped at any step and continued on a fresh
pipeline from its last saved state gives the same video, bit for bit, as a run never stopped."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler

from gpu.vap import resume as resume_module
from gpu.vap.resume import (
    MAGIC,
    DenoiseState,
    Resumable,
    ResumeRefused,
    RunIdentity,
    decode_state,
)
from gpu.vap.tiny import build_tiny_pipeline

pytestmark = pytest.mark.slow

H, W, FRAMES, STEPS = 16, 32, 5, 8
STEP_S, EVERY_S = 10.0, 25.0  # each transformer call advances the clock 10 s: saves after steps 3 and 6
SAVED_AFTER = (3, 6)


class Preempted(Exception):
    """The container went away in the middle of a step."""


def _frames(seed: int, n: int) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)) for _ in range(n)]


@dataclass
class Run:
    """One attempt on a fresh pipeline (a fresh worker): its video, final latents and what it saved."""

    frames: np.ndarray
    latents: torch.Tensor
    steps_seen: list[int]
    resume: Resumable
    scheduler: Any


@dataclass
class Storage:
    """Where the saved state lives between attempts (the latest save replaces the one before)."""

    state: bytes | None = None
    saves: list[int] = field(default_factory=list)

    def put(self, data: bytes) -> None:
        self.state = data
        self.saves.append(int(resume_module._metadata(data[len(MAGIC) + 32 :])["steps_done"]))


def _attempt(
    storage: Storage,
    *,
    guidance: float = 5.0,
    preempt_at_call: int | None = None,
    key: str = "job-1",
    steps: int = STEPS,
    seed: int = 0,
    use_resume: bool = True,
) -> Run:
    """Run the job on a new pipeline; raise `Preempted` inside transformer call `preempt_at_call`."""
    pipe = build_tiny_pipeline(seed=0)
    clock = {"now": 0.0, "calls": 0}
    forward = pipe.transformer.forward

    def timed_forward(*args: Any, **kwargs: Any) -> Any:
        if clock["calls"] == preempt_at_call:
            raise Preempted
        clock["calls"] += 1
        clock["now"] += STEP_S
        return forward(*args, **kwargs)

    pipe.transformer.forward = timed_forward
    seen: list[int] = []
    final: dict[str, torch.Tensor] = {}

    def on_step(_pipe: Any, i: int, _t: Any, kwargs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seen.append(i)
        final["latents"] = kwargs["latents"].clone()
        return {}

    plan = Resumable(
        key=key, save=storage.put, saved=storage.state, every_s=EVERY_S, clock=lambda: clock["now"]
    )
    out = pipe(
        image=_frames(1, 1)[0],
        ref_video=_frames(2, FRAMES),
        prompt="a dog runs",
        prompt_mot_ref="a cat walks",
        height=H,
        width=W,
        num_frames=FRAMES,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        callback_on_step_end=on_step,
        resume=plan if use_resume else None,
    )
    return Run(out.frames, final["latents"], seen, plan, pipe.scheduler)


def _preempted_then_resumed(guidance: float, preempt_at_call: int) -> tuple[Run, Storage]:
    storage = Storage()
    with pytest.raises(Preempted):
        _attempt(storage, guidance=guidance, preempt_at_call=preempt_at_call)
    return _attempt(storage, guidance=guidance), storage


def _uint8(frames: np.ndarray) -> np.ndarray:
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _assert_same_video(a: Run, b: Run) -> None:
    assert a.latents.dtype == b.latents.dtype and torch.equal(a.latents, b.latents)
    assert np.array_equal(_uint8(a.frames), _uint8(b.frames))
    assert np.array_equal(a.frames, b.frames)  # the float frames too: nothing differs at all


@pytest.fixture(scope="module")
def never_stopped() -> dict[float, Run]:
    return {g: _attempt(Storage(), guidance=g) for g in (5.0, 1.0)}


def test_saving_changes_nothing(never_stopped):
    plain = _attempt(Storage(), use_resume=False)
    _assert_same_video(plain, never_stopped[5.0])
    assert [s.steps_done for s in never_stopped[5.0].resume.saves] == list(SAVED_AFTER)


@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg-batch-2", "batch-1"])
@pytest.mark.parametrize("seed", [0, 1])
def test_resumed_at_a_random_step_is_bitwise_identical(never_stopped, guidance, seed):
    preempt_at = random.Random(seed * 10 + int(guidance)).randrange(1, STEPS)
    resumed, _ = _preempted_then_resumed(guidance, preempt_at)
    expected_start = max((s for s in SAVED_AFTER if s <= preempt_at), default=0)
    assert resumed.resume.resumed_at == expected_start and resumed.resume.refused is None
    assert resumed.steps_seen == list(range(expected_start, STEPS))
    _assert_same_video(resumed, never_stopped[guidance])


def test_stopped_right_after_a_save_redoes_nothing(never_stopped):
    # Call 3 is step index 3: steps 0..2 are done and the state after them was just saved.
    resumed, _ = _preempted_then_resumed(5.0, preempt_at_call=3)
    assert resumed.resume.resumed_at == 3 and resumed.steps_seen[0] == 3
    _assert_same_video(resumed, never_stopped[5.0])


def test_stopped_right_before_a_save_redoes_since_the_last(never_stopped):
    # Call 5 is the step whose end would have saved (after 6 steps): the last state is after 3.
    resumed, storage = _preempted_then_resumed(5.0, preempt_at_call=5)
    # The first attempt saved after 3 steps only; the second resumed there and saved after 6.
    assert storage.saves == [3, 6] and resumed.resume.resumed_at == 3
    _assert_same_video(resumed, never_stopped[5.0])


def test_stopped_before_any_save_starts_over(never_stopped):
    resumed, _ = _preempted_then_resumed(5.0, preempt_at_call=2)
    assert resumed.resume.resumed_at == 0 and resumed.resume.refused is None
    assert resumed.steps_seen == list(range(STEPS))
    _assert_same_video(resumed, never_stopped[5.0])


def test_preempted_twice_still_bitwise_identical(never_stopped):
    storage = Storage()
    with pytest.raises(Preempted):
        _attempt(storage, preempt_at_call=4)  # saved after 3
    with pytest.raises(Preempted):
        _attempt(storage, preempt_at_call=4)  # resumed at 3: calls 0..3 are steps 3..6, saved after 6
    assert storage.saves == [3, 6]
    final = _attempt(storage)
    assert final.resume.resumed_at == 6
    _assert_same_video(final, never_stopped[5.0])


def _scheduler_memory(scheduler: Any) -> dict[str, Any]:
    """Everything the scheduler instance holds, comparable (tensors as CPU tensors, timesteps as ints)."""
    out: dict[str, Any] = {}
    for name, value in vars(scheduler).items():
        if isinstance(value, torch.Tensor):
            out[name] = value.cpu()
        elif isinstance(value, list):
            out[name] = [
                (int(v) if v.ndim == 0 and not v.is_floating_point() else v.cpu())
                if isinstance(v, torch.Tensor)
                else v
                for v in value
            ]
        else:
            out[name] = value
    return out


def test_resumed_scheduler_holds_what_the_uninterrupted_one_holds(never_stopped):
    # Everything UniPC keeps between steps must travel in the state: after the resumed run, its
    # scheduler holds the same values as one that never stopped (catches a field a new diffusers
    # adds, or one the state forgets).
    resumed, _ = _preempted_then_resumed(5.0, preempt_at_call=4)
    ours, theirs = _scheduler_memory(resumed.scheduler), _scheduler_memory(never_stopped[5.0].scheduler)
    assert ours.keys() == theirs.keys()
    for name in ours:
        a, b = ours[name], theirs[name]
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
        elif isinstance(a, list):
            assert len(a) == len(b), name
            for x, y in zip(a, b, strict=True):
                assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, name
        elif name != "config":
            assert a == b, name


# -- refusals: a state that is not this run's is never continued -------------------------------------
@pytest.fixture(scope="module")
def saved_after_3() -> bytes:
    storage = Storage()
    with pytest.raises(Preempted):
        _attempt(storage, preempt_at_call=4)
    assert storage.state is not None
    return storage.state


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (dict(key="job-2"), "another job"),
        (dict(guidance=4.0), "other settings"),
        (dict(seed=7), "other settings"),
        (dict(steps=STEPS + 2), f"saved for {STEPS} steps"),
    ],
    ids=["other-job", "other-guidance", "other-seed", "other-step-count"],
)
def test_state_of_another_run_is_refused(never_stopped, saved_after_3, change, reason):
    run = _attempt(Storage(state=saved_after_3), **change)
    assert run.resume.resumed_at == 0 and reason in (run.resume.refused or "")
    assert run.steps_seen[0] == 0
    if change.get("key"):
        _assert_same_video(run, never_stopped[5.0])  # started over: the right video all the same


def _identity_of(run_state: bytes) -> RunIdentity:
    meta = resume_module._metadata(run_state[len(MAGIC) + 32 :])
    return RunIdentity(meta["fingerprint"], int(meta["total_steps"]), (1, 16, 2, 2, 4))


def test_the_saved_state_decodes_for_its_own_run(saved_after_3):
    state = decode_state(saved_after_3, _identity_of(saved_after_3))
    assert isinstance(state, DenoiseState) and state.steps_done == 3
    assert state.scheduler_meta["step_index"] == 3 and state.scheduler_meta["lower_order_nums"] == 2


def test_damaged_or_foreign_bytes_are_refused(saved_after_3):
    identity = _identity_of(saved_after_3)
    flipped = bytearray(saved_after_3)
    flipped[-3] ^= 0x01
    cases = {
        "no magic": b"PK\x03\x04" + saved_after_3[4:],
        "checksum": bytes(flipped),
        "checksum ": saved_after_3[: len(saved_after_3) // 2],  # truncated upload
    }
    for reason, data in cases.items():
        with pytest.raises(ResumeRefused, match=reason.strip()):
            decode_state(data, identity)
    with pytest.raises(ResumeRefused, match="latents are"):
        decode_state(saved_after_3, RunIdentity(identity.fingerprint, identity.total_steps, (1, 16, 3, 2, 4)))


def test_a_state_of_another_format_version_is_refused(monkeypatch, saved_after_3):
    identity = _identity_of(saved_after_3)
    state = decode_state(saved_after_3, identity)
    pipe = build_tiny_pipeline(seed=0)
    pipe._set_timesteps(STEPS)
    resume_module.restore(state, pipe.scheduler, torch.device("cpu"))
    monkeypatch.setattr(resume_module, "FORMAT_VERSION", 2)
    newer = resume_module.encode_state(identity, 3, state.latents, pipe.scheduler)
    monkeypatch.undo()
    with pytest.raises(ResumeRefused, match="format version 2; this code reads 1"):
        decode_state(newer, identity)


def test_the_state_holds_the_latents_and_the_solver_memory_only(saved_after_3):
    # Four latent-sized float32 tensors (latents, last sample, two model outputs) plus the
    # schedule and a header: the conditions and encodings are recomputed, never saved.
    latent_bytes = 1 * 16 * 2 * 2 * 4 * 4
    assert 4 * latent_bytes < len(saved_after_3) < 4 * latent_bytes + 4096


class FailingStorage(Storage):
    def put(self, data: bytes) -> None:
        self.saves.append(-1)
        raise OSError("upload refused")


def test_a_failed_save_costs_resumability_not_the_job(never_stopped):
    storage = FailingStorage()
    run = _attempt(storage)
    assert storage.saves == [-1, -1] and storage.state is None
    assert [(r.steps_done, r.error) for r in run.resume.saves] == [
        (3, "OSError: upload refused"),
        (6, "OSError: upload refused"),
    ]
    _assert_same_video(run, never_stopped[5.0])


def test_saves_run_off_the_loop_thread_and_are_done_when_the_call_returns():
    threads: list[str] = []

    class Recording(Storage):
        def put(self, data: bytes) -> None:
            threads.append(threading.current_thread().name)
            super().put(data)

    storage = Recording()
    run = _attempt(storage)
    assert threads == ["vap-state-save", "vap-state-save"] and storage.saves == [3, 6]
    assert all(r.bytes == len(storage.state or b"") and r.error is None for r in run.resume.saves)


def test_resumable_settings_are_checked():
    with pytest.raises(ValueError, match="every_s"):
        Resumable(key="job", save=lambda b: None, every_s=61)
    with pytest.raises(ValueError, match="key"):
        Resumable(key="", save=lambda b: None)


def test_an_unsupported_scheduler_is_an_error_not_a_wrong_resume():
    pipe = build_tiny_pipeline(seed=0)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    with pytest.raises(ValueError, match="supports UniPCMultistepScheduler"):
        pipe(
            image=_frames(1, 1)[0],
            ref_video=_frames(2, FRAMES),
            prompt="a dog runs",
            prompt_mot_ref="a cat walks",
            height=H,
            width=W,
            num_frames=FRAMES,
            num_inference_steps=2,
            resume=Resumable(key="job", save=lambda b: None),
        )
