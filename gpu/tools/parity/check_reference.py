"""Parity of `gpu.vap` with the reference implementation (bytedance/Video-As-Prompt), on CPU.

Imports the reference fork's transformer, UniPC scheduler and pipeline *by file path* from a
checkout given with `--reference` (never vendored here) onto the installed diffusers, builds both
models with the same tiny random weights, and checks:

1. identical transformer state-dict keys and shapes (and a strict load both ways);
2. transformer outputs (batch 1, and our one-batch CFG vs the reference's two calls) within
   `--tol` relative error in float32;
3. the whole pipeline (text/CLIP/VAE encodings, schedule, CFG loop, decode) with shared tiny
   components: latents and frames within `--tol`.

Usage (see docs/parity.md); nothing is downloaded, the reference must already be on this machine:
    make parity VAP_REFERENCE=<checkout or git mirror of bytedance/Video-As-Prompt>
    .venv/bin/python -m gpu.tools.parity.check_reference --reference <same> [--write docs/parity.md]
`--reference` defaults to $VAP_REFERENCE, then .local/vap-reference. A git directory without a work
tree (a mirror) is exported to a temporary folder first. What the reference imports (einops) is in
requirements/dev.txt, so `make venv` installs it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import importlib.util
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import PIL.Image
import torch

from gpu.tools.parity.report import Row, Run, write
from gpu.vap.geometry import TEXT_TOKENS

_FORK = "diffusers/src/diffusers"
REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_REFERENCE = REPO_ROOT / ".local" / "vap-reference"
EXIT_NO_REFERENCE = 2


class ReferenceMissing(SystemExit):
    """The reference code is not on this machine: say so, write nothing, exit non-zero."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_NO_REFERENCE)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _git(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", *args], capture_output=True, timeout=300, check=False, **kwargs)  # noqa: S603, S607


@contextlib.contextmanager
def reference_tree(path: Path) -> Iterator[tuple[Path, str]]:
    """(a work tree holding the reference's diffusers fork, its commit) from a checkout or a git dir."""
    missing = (
        f"The reference implementation is not at {path}. `make parity` downloads nothing: put a checkout "
        "or a git mirror of bytedance/Video-As-Prompt there, or name one with "
        "VAP_REFERENCE=<path> (make parity) / --reference. No figures were written."
    )
    if not path.exists():
        raise ReferenceMissing(missing)
    if (path / _FORK).is_dir():
        done = _git(["-C", str(path), "rev-parse", "HEAD"])
        yield path, done.stdout.decode().strip() if done.returncode == 0 else "unknown (not a git checkout)"
        return
    head = _git(["--git-dir", str(path), "rev-parse", "HEAD"])
    if head.returncode != 0:
        raise ReferenceMissing(f"{path} is neither a Video-As-Prompt checkout nor a git directory. {missing}")
    archive = _git(["--git-dir", str(path), "archive", "--format=tar", "HEAD", "diffusers/src"])
    if archive.returncode != 0:
        raise ReferenceMissing(f"{path} has no diffusers/src at HEAD ({archive.stderr.decode().strip()}).")
    with tempfile.TemporaryDirectory(prefix="vap-reference-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tmp, filter="data")
        yield Path(tmp), head.stdout.decode().strip()


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for dist in ("torch", "diffusers", "transformers", "einops"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def _load(ref_root: Path, rel: str, module_name: str) -> ModuleType:
    """Execute one reference file as a submodule of the installed diffusers (relative imports work)."""
    path = ref_root / _FORK / rel
    if not path.is_file():
        raise ReferenceMissing(f"not found: {path} (is --reference a Video-As-Prompt checkout?)")
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def load_reference(ref_root: Path) -> dict[str, Any]:
    import diffusers.models

    tr = _load(
        ref_root,
        "models/transformers/transformer_wan_mot.py",
        "diffusers.models.transformers._vapref_transformer_wan_mot",
    )
    sched = _load(
        ref_root,
        "schedulers/scheduling_unipc_multistep.py",
        "diffusers.schedulers._vapref_scheduling_unipc_multistep",
    )
    # The reference pipeline imports the transformer class from `diffusers.models`.
    diffusers.models.WanTransformer3DMOTModel = tr.WanTransformer3DMOTModel  # type: ignore[attr-defined]
    pipe = _load(
        ref_root,
        "pipelines/wan/pipeline_wan_i2v_mot.py",
        "diffusers.pipelines.wan._vapref_pipeline_wan_i2v_mot",
    )
    return {
        "transformer": tr.WanTransformer3DMOTModel,
        "scheduler": sched.UniPCMultistepScheduler,
        "pipeline": pipe.WanImageToVideoMOTPipeline,
    }


def rel_err(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> tuple[float, float]:
    """(‖a−b‖/‖b‖, max|a−b|) in float64."""
    ta = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).double()
    tb = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).double()
    return float((ta - tb).norm() / tb.norm()), float((ta - tb).abs().max())


PARITY_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 24,
    "in_channels": 36,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 256,
    "ffn_dim": 64,
    "num_layers": 4,
    "image_dim": 16,
    "added_kv_proj_dim": 48,
    # Two expert blocks with a plain block between and after: covers the full expert block, the
    # last-expert shortcut and the pass-through.
    "block_idx_with_mot_ref": [0, 2],
}


def check_transformer(ref: dict[str, Any], tol: float, rows: list[tuple[str, str, bool]]) -> None:
    from gpu.vap.transformer import WanTransformer3DMOTModel, cast_like_checkpoint

    torch.manual_seed(0)
    theirs = ref["transformer"](**PARITY_CONFIG).eval()
    ours = WanTransformer3DMOTModel(**PARITY_CONFIG).eval()
    sd = {k: torch.randn_like(v) * 0.2 for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(sd, strict=True)
    ours_sd = ours.state_dict()
    same_keys = ours_sd.keys() == sd.keys()
    same_shapes = same_keys and all(ours_sd[k].shape == v.shape for k, v in sd.items())
    ours.load_state_dict(sd, strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    rows.append(("state dict keys", f"{len(sd)} keys, identical={same_keys}", same_keys))
    rows.append(("state dict shapes", f"identical={same_shapes}", same_shapes))

    g = torch.Generator().manual_seed(1)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    lat, lat_ref = rnd(2, 36, 3, 4, 6), rnd(1, 36, 3, 4, 6)
    txt, img = rnd(2, TEXT_TOKENS, 32), rnd(2, 5, 16)
    txt_ref, img_ref = rnd(2, TEXT_TOKENS, 32), rnd(2, 5, 16)
    t = torch.tensor([700, 700])

    def reference(i: int) -> torch.Tensor:
        return theirs(
            hidden_states=lat[i : i + 1],
            timestep=t[i : i + 1],
            encoder_hidden_states=txt[i : i + 1],
            encoder_hidden_states_image=img[i : i + 1],
            return_dict=False,
            num_mot_ref=1,
            hidden_states_mot_ref=lat_ref,
            timestep_list_mot_ref=torch.tensor([[1]]),
            encoder_hidden_states_mot_ref=txt_ref[i : i + 1],
            encoder_hidden_states_image_mot_ref=img_ref[i : i + 1],
        )[0]

    with torch.no_grad():
        expected = torch.cat([reference(0), reference(1)])
        single = ours(lat[:1], t[:1], txt[:1], img[:1], lat_ref, txt_ref[:1], img_ref[:1], return_dict=False)[
            0
        ]
        batched = ours(lat, t, txt, img, lat_ref, txt_ref, img_ref, return_dict=False)[0]
    for name, got, want in [
        ("transformer fp32, batch 1", single, expected[:1]),
        ("transformer fp32, CFG batch 2 vs 2 calls", batched, expected),
    ]:
        rel, mx = rel_err(got, want)
        rows.append((name, f"rel {rel:.2e}, max abs {mx:.2e}", rel <= tol))

    # bf16 as loaded from the checkpoint (fp32 kept per `_keep_in_fp32_modules` on both sides).
    # Informational: the two differ only in rotary precision (fp64 complex vs fp32) and in
    # diffusers' RMSNorm implementations, so a bf16 rounding-level bound is all that is expected.
    cast_like_checkpoint(ours, torch.bfloat16)
    cast_like_checkpoint(theirs, torch.bfloat16)
    bf = {
        "txt": txt.bfloat16(),
        "img": img.bfloat16(),
        "txt_ref": txt_ref.bfloat16(),
        "img_ref": img_ref.bfloat16(),
    }
    with torch.no_grad():
        got = ours(
            lat.bfloat16(), t, bf["txt"], bf["img"], lat_ref.bfloat16(), bf["txt_ref"], bf["img_ref"]
        ).sample
        want = theirs(
            hidden_states=lat[:1].bfloat16(),
            timestep=t[:1],
            encoder_hidden_states=bf["txt"][:1],
            encoder_hidden_states_image=bf["img"][:1],
            return_dict=False,
            num_mot_ref=1,
            hidden_states_mot_ref=lat_ref.bfloat16(),
            timestep_list_mot_ref=torch.tensor([[1]]),
            encoder_hidden_states_mot_ref=bf["txt_ref"][:1],
            encoder_hidden_states_image_mot_ref=bf["img_ref"][:1],
        )[0]
    rel, mx = rel_err(got[:1].float(), want.float())
    rows.append(
        ("transformer bf16 (info), batch 1 of CFG batch", f"rel {rel:.2e}, max abs {mx:.2e}", rel <= 2e-2)
    )


def check_14b_layout(ref: dict[str, Any], rows: list[tuple[str, str, bool]]) -> None:
    """Both models at the released size on the meta device: names and shapes without memory."""
    from gpu.vap.configs import RELEASED_14B_CONFIG
    from gpu.vap.transformer import WanTransformer3DMOTModel

    with torch.device("meta"):
        theirs = ref["transformer"](**RELEASED_14B_CONFIG).state_dict()
        ours = WanTransformer3DMOTModel(**RELEASED_14B_CONFIG).state_dict()
    same = theirs.keys() == ours.keys() and all(ours[k].shape == v.shape for k, v in theirs.items())
    params = sum(v.numel() for v in ours.values())
    rows.append(
        ("14B layout (meta): keys + shapes", f"{len(ours)} keys, {params / 1e9:.2f} B, same={same}", same)
    )


def _frames(seed: int, n: int, h: int, w: int) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n)]


def check_pipeline(ref: dict[str, Any], tol: float, rows: list[tuple[str, str, bool]]) -> None:
    from gpu.vap.tiny import build_tiny_pipeline

    ours = build_tiny_pipeline(seed=0)
    theirs_tr = ref["transformer"](**dict(ours.transformer.config)).eval()
    theirs_tr.load_state_dict(ours.transformer.state_dict(), strict=True)
    theirs = ref["pipeline"](
        tokenizer=ours.tokenizer,
        text_encoder=ours.text_encoder,
        image_encoder=ours.image_encoder,
        image_processor=ours.image_processor,
        transformer=theirs_tr,
        vae=ours.vae,
        scheduler=ref["scheduler"].from_config(ours.scheduler.config),
    )
    theirs.set_progress_bar_config(disable=True)
    h, w, f, steps = 16, 32, 9, 4
    image, video = _frames(1, 1, h, w)[0], _frames(2, f, h, w)
    prompt = "a woman turns to the camera and transforms into a toy character"
    prompt_ref = "a man walks on the street and golden particles light him"
    for output_type in ("latent", "np"):
        want = theirs(
            image=image,
            ref_videos=[list(video)],
            prompt=prompt,
            prompt_mot_ref=[prompt_ref],  # the reference iterates this: one-element list
            height=h,
            width=w,
            num_frames=f,
            num_inference_steps=steps,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(0),
            output_type=output_type,
        ).frames
        got_out: Any = ours(
            image=image,
            ref_video=video,
            prompt=prompt,
            prompt_mot_ref=prompt_ref,
            height=h,
            width=w,
            num_frames=f,
            num_inference_steps=steps,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(0),
            output_type=output_type,
        )
        got = got_out.frames
        rel, mx = rel_err(got, want)
        shape = tuple(np.asarray(got).shape)
        label = f"pipeline fp32 {steps} steps, {output_type} {shape}"
        rows.append(
            (label, f"rel {rel:.2e}, max abs {mx:.2e}", rel <= tol and shape == np.asarray(want).shape)
        )
        if output_type == "latent":
            # Control: the check must notice a real difference. diffusers 0.42.1's own UniPC
            # flow schedule (instead of the fork's sigmas) has to FAIL the tolerance.
            ours.scheduler.set_timesteps(steps)
            stock = ours.scheduler.timesteps.clone()
            original = ours._set_timesteps

            def stock_schedule(n: int) -> torch.Tensor:
                ours.scheduler.set_timesteps(n)
                return ours.scheduler.timesteps

            ours._set_timesteps = stock_schedule  # type: ignore[method-assign,assignment]
            try:
                drift_out: Any = ours(
                    image=image,
                    ref_video=video,
                    prompt=prompt,
                    prompt_mot_ref=prompt_ref,
                    height=h,
                    width=w,
                    num_frames=f,
                    num_inference_steps=steps,
                    guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(0),
                    output_type=output_type,
                )
                drift = drift_out.frames
            finally:
                ours._set_timesteps = original  # type: ignore[method-assign]
            rel, mx = rel_err(drift, want)
            rows.append(
                (
                    f"control: stock 0.42.1 schedule {stock.tolist()} must differ",
                    f"rel {rel:.2e}, max abs {mx:.2e}",
                    rel > tol,
                )
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--reference",
        type=Path,
        default=Path(os.environ.get("VAP_REFERENCE") or DEFAULT_REFERENCE),
        help="Video-As-Prompt checkout or git mirror (default: $VAP_REFERENCE, else .local/vap-reference)",
    )
    parser.add_argument("--tol", type=float, default=1e-5, help="max relative error (float32)")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--write", type=Path, help="replace the generated section of this document")
    args = parser.parse_args(argv)

    torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        with reference_tree(args.reference.resolve()) as (tree, commit):
            ref = load_reference(tree)
            rows: list[tuple[str, str, bool]] = []
            check_14b_layout(ref, rows)
            check_transformer(ref, args.tol, rows)
            if not args.skip_pipeline:
                check_pipeline(ref, args.tol, rows)
    except ReferenceMissing as exc:
        print(f"parity: {exc.message}", file=sys.stderr)
        return EXIT_NO_REFERENCE
    width = max(len(r[0]) for r in rows)
    for name, value, ok in rows:
        print(f"{'PASS' if ok else 'FAIL'}  {name:<{width}}  {value}")
    run = Run(
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        reference_commit=commit,
        versions=versions(),
        tolerance=args.tol,
        rows=[Row(name, value, ok) for name, value, ok in rows],
    )
    if args.write is not None:
        if args.skip_pipeline:
            print("parity: --skip-pipeline runs are not written (the document shows the whole check)")
            return 1
        write(args.write, run)
        print(f"wrote the result into {args.write}")
    return 0 if run.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
