"""`SequenceParallelEngine`: one job at a time over `world_size` local processes (one per GPU).

Rank 0 is the calling process: it loads the whole pipeline, runs the encoders, the VAE, the
scheduler and all I/O exactly as `VideoEngine` does. Ranks 1..N-1 are spawned processes that load
only the transformer and follow: every transformer call on rank 0 first sends its arguments to
them (`wire`), then all ranks run that forward together, each on its slice of the tokens
(`sequence`), meeting in the all-to-alls. Commands between calls travel over pipes, so an idle
follower waits on a pipe, never inside a collective (no collective timeout while idle).

A failure inside a forward (an exception on rank 0 mid-call, a follower dying) leaves the ranks
out of step: the engine then refuses further jobs (`healthy` is False) and the process must be
replaced. With NCCL, a collective that waits longer than `timeout_s` aborts the process.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import socket
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from gpu.parallel.sequence import SequenceParallel, apply_split
from gpu.service.engines.loaders import TransformerOf
from gpu.service.engines.single import Checkpoints, StepCallback, VideoEngine, device_name
from gpu.service.engines.wire import CallReceiver, CallSender
from gpu.service.generation import GenerationSpec

log = logging.getLogger(__name__)

Loader = Callable[[torch.device], Any]
_POLL_S = 1.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _device(device_type: str, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


def _init_group(rank: int, world: int, port: int, device_type: str, timeout_s: float) -> torch.device:
    device = _device(device_type, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    return device


def _weights_fingerprint(model: torch.nn.Module) -> list[float]:
    """Parameter count, sum and absolute sum (float64): equal on every rank, or the split forward
    is silently wrong."""
    with torch.no_grad():
        params = list(model.parameters())
        total = sum((p.detach().double().sum() for p in params), torch.zeros((), dtype=torch.float64))
        absolute = sum(
            (p.detach().double().abs().sum() for p in params), torch.zeros((), dtype=torch.float64)
        )
    return [float(len(params)), float(total), float(absolute)]


def _check_same_weights(mine: list[float], followers: list[list[float]]) -> None:
    # Compared on rank 0 from what each follower sent with its "ready": no collective at startup,
    # where ranks that loaded first would wait on rank 0's longer load within the group's timeout.
    for theirs in followers:
        if not all(math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0) for a, b in zip(mine, theirs, strict=True)):
            raise RuntimeError(f"ranks loaded different transformer weights: {[mine, *followers]}")


def _follower_main(
    rank: int,
    world: int,
    port: int,
    device_type: str,
    timeout_s: float,
    loader: Loader,
    commands: Connection,
    ready: Connection,
    threads: int | None,
) -> None:
    """Ranks 1..N-1: load the transformer, then run every forward rank 0 announces until shutdown."""
    if threads:
        torch.set_num_threads(threads)
    device = _init_group(rank, world, port, device_type, timeout_s)
    try:
        model = loader(device)
        apply_split(model)
    except BaseException:
        ready.send(traceback.format_exc())
        raise
    ready.send(_weights_fingerprint(model))
    receiver = CallReceiver(device)
    parent = mp.parent_process()
    with torch.inference_mode():
        while True:
            while not commands.poll(_POLL_S):
                if parent is not None and not parent.is_alive():
                    return
            kind, header = commands.recv()
            if kind == "shutdown":
                break
            if kind == "end":
                receiver.reset()
                continue
            model(**receiver.receive(header))
    dist.destroy_process_group()


class _Driver:
    """Rank 0: announces each transformer forward to the followers (a forward pre-hook)."""

    def __init__(self, model: torch.nn.Module, commands: list[Connection]) -> None:
        self.commands = commands
        self.sender = CallSender()
        self.signature = inspect.signature(model.forward)
        self.in_forward = False  # still True after a forward that raised: ranks out of step
        model.register_forward_pre_hook(self._before, with_kwargs=True)
        model.register_forward_hook(self._after)

    def _before(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.in_forward = True
        header, tensors = self.sender.header(dict(self.signature.bind(*args, **kwargs).arguments))
        for conn in self.commands:
            conn.send(("forward", header))
        self.sender.broadcast(tensors)

    def _after(self, *_: Any) -> None:
        self.in_forward = False

    def end(self) -> None:
        """Between jobs: drop the cached arguments on every rank."""
        self.sender.reset()
        for conn in self.commands:
            conn.send(("end", None))


class SequenceParallelEngine:
    """`gpu.service.engines.single.Engine` that runs each job over `world_size` local processes (one per GPU).

    `pipeline_loader(device)` returns a `VAPPipeline` on `device` (rank 0: `cuda:0` or `cpu`);
    `transformer_loader(device)` returns the same transformer on a follower's device (default:
    the pipeline loader, keeping only its transformer). Both must be picklable (top-level
    functions, `functools.partial` of them, or `gpu.service.engines.loaders` objects). NCCL on CUDA,
    gloo on CPU (`device_type="cpu"` runs the CPU check). Build it once per container; `close()`
    stops the followers."""

    def __init__(
        self,
        pipeline_loader: Loader,
        world_size: int,
        *,
        transformer_loader: Loader | None = None,
        device_type: str | None = None,
        negative_prompt: str | None = None,
        timeout_s: float = 600.0,
        startup_timeout_s: float = 1200.0,
        threads_per_rank: int | None = None,
        weights: str = "",
    ) -> None:
        if world_size < 2:
            raise ValueError("world_size must be >= 2 (use VideoEngine for one device)")
        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        if device_type == "cuda" and torch.cuda.device_count() < world_size:
            raise ValueError(
                f"{world_size} ranks need {world_size} GPUs, {torch.cuda.device_count()} visible"
            )
        self.world_size = world_size
        self.gpu_count = world_size  # reported as GpuResult.gpu_count
        self._lock = threading.Lock()
        self._broken: str | None = None
        deadline = time.monotonic() + startup_timeout_s  # for every rank's load, this one's included
        ctx = mp.get_context("spawn")
        port = _free_port()
        follower_loader = transformer_loader or TransformerOf(pipeline_loader)
        self._commands: list[Connection] = []
        ready: list[Connection] = []
        self._procs = []
        for rank in range(1, world_size):
            command_recv, command_send = ctx.Pipe(duplex=False)
            ready_recv, ready_send = ctx.Pipe(duplex=False)
            args = (rank, world_size, port, device_type, timeout_s, follower_loader, command_recv, ready_send,
                    threads_per_rank)  # fmt: skip
            proc = ctx.Process(target=_follower_main, args=args, daemon=True, name=f"vap-rank{rank}")
            proc.start()
            self._procs.append(proc)
            self._commands.append(command_send)
            ready.append(ready_recv)
        try:
            device = _init_group(0, world_size, port, device_type, timeout_s)
            pipeline = pipeline_loader(device)
            fingerprints = self._wait_ready(ready, deadline)
            _check_same_weights(_weights_fingerprint(pipeline.transformer), fingerprints)
            split = apply_split(pipeline.transformer)
        except BaseException:
            self._stop_followers()
            raise
        self.pipeline = pipeline
        self.split: SequenceParallel = split  # rank 0's side of the split (its exchange counts)
        self._driver = _Driver(pipeline.transformer, self._commands)
        self._inner = VideoEngine(pipeline, device, negative_prompt, weights=weights)
        self.device_name = f"{world_size}x {device_name(device)}"

    def _wait_ready(self, ready: list[Connection], deadline: float) -> list[list[float]]:
        """Each follower's weights fingerprint, once it has loaded; `deadline`: time.monotonic()."""
        fingerprints = []
        for rank, (conn, proc) in enumerate(zip(ready, self._procs, strict=True), start=1):
            while not conn.poll(_POLL_S):
                if not proc.is_alive():
                    raise RuntimeError(f"rank {rank} exited while loading (exit code {proc.exitcode})")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rank {rank} did not load within the startup time")
            answer = conn.recv()
            if isinstance(answer, str):
                raise RuntimeError(f"rank {rank} failed to load:\n{answer}")
            fingerprints.append(answer)
        return fingerprints

    @property
    def healthy(self) -> bool:
        """False once the ranks may be out of step or a follower is gone: replace the process."""
        return self._broken is None and all(p.is_alive() for p in self._procs)

    def check_split(self, spec: GenerationSpec) -> None:
        """Refuse, before any rank starts, a size whose token streams have fewer tokens than ranks."""
        tokens = self.pipeline.geometry.tokens_per_stream(spec.num_frames, spec.height, spec.width)
        if tokens < self.world_size:
            raise ValueError(f"{tokens} tokens per stream cannot be split over {self.world_size} GPUs")

    def generate(
        self,
        spec: GenerationSpec,
        image: Image.Image,
        ref_frames: list[Image.Image],
        on_step: StepCallback,
        checkpoints: Checkpoints | None = None,
    ) -> np.ndarray:
        with self._lock:
            if not self.healthy:
                raise RuntimeError(f"sequence-parallel engine unusable ({self._broken or 'a rank exited'})")
            self.check_split(spec)
            try:
                return self._inner.generate(spec, image, ref_frames, on_step, checkpoints)
            except BaseException as exc:
                if self._driver.in_forward:
                    self._broken = f"a forward was interrupted: {type(exc).__name__}"
                raise
            finally:
                if self._broken is None:
                    self._driver.end()

    def _stop_followers(self, wait_s: float = 30.0) -> None:
        for conn in self._commands:
            with contextlib.suppress(OSError):  # that follower is gone already
                conn.send(("shutdown", None))
        for proc in self._procs:
            proc.join(timeout=wait_s)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if dist.is_initialized():
            dist.destroy_process_group()

    def close(self) -> None:
        """Stop the followers and leave the process group (the engine cannot be used afterwards)."""
        with self._lock:
            # Out of step, a follower may sit in a collective until its timeout: don't wait for it.
            wait_s = 30.0 if self._broken is None else 0.0
            self._broken = self._broken or "closed"
            self._stop_followers(wait_s)
