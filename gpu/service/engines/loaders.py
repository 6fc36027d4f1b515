"""Picklable loader callables for `SequenceParallelEngine` (spawned ranks receive them by pickle)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class TransformerOf:
    """A follower rank's loader from a pipeline loader: load it, keep only the transformer.

    Simple but wasteful (the encoders and the VAE load and are dropped); pass a transformer-only
    loader to `SequenceParallelEngine` to skip that."""

    def __init__(self, pipeline_loader: Callable[[torch.device], Any]) -> None:
        self.pipeline_loader = pipeline_loader

    def __call__(self, device: torch.device) -> Any:
        pipeline = self.pipeline_loader(device)
        transformer = pipeline.transformer
        del pipeline
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return transformer


class TinyPipeline:
    """The tiny random VAP pipeline (gpu.vap.tiny) on `device`; same weights on every rank.

    `heads` swaps in a tiny transformer with that many 6-wide heads (the stock one has 2 × 12),
    so that 4 or 8 ranks can split them: the Ulysses split is over heads."""

    def __init__(self, seed: int = 0, heads: int | None = None) -> None:
        self.seed = seed
        self.heads = heads

    def __call__(self, device: torch.device) -> Any:
        from gpu.vap.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_pipeline
        from gpu.vap.transformer import WanTransformer3DMOTModel

        pipe = build_tiny_pipeline(self.seed)
        if self.heads is not None:
            config = {**TINY_TRANSFORMER_CONFIG, "num_attention_heads": self.heads, "attention_head_dim": 6}
            config["added_kv_proj_dim"] = 6 * self.heads  # = the model width, as in Wan I2V
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + 3)
                pipe.transformer = WanTransformer3DMOTModel(**config).eval()
        return pipe.to(device)


class ReleasedTransformer:
    """A follower's loader for the released checkpoint: only the transformer, with the attention
    backend `gpu.vap.loading.load_pipeline` would pick (no UMT5/CLIP/VAE load on followers)."""

    def __init__(
        self,
        path_or_repo: str,
        revision: str,
        dtype: torch.dtype = torch.bfloat16,
        attention_backend: str | None = None,
    ) -> None:
        self.path_or_repo = path_or_repo
        self.revision = revision
        self.dtype = dtype
        self.attention_backend = attention_backend

    def __call__(self, device: torch.device) -> Any:
        import os

        from huggingface_hub import snapshot_download

        from gpu.vap.attention import choose_backend
        from gpu.vap.loading import load_transformer, require_commit

        path = self.path_or_repo
        if not os.path.isdir(path):
            path = snapshot_download(path, revision=require_commit(path, self.revision))
        model = load_transformer(path, self.dtype, device)
        # The same choice as `load_pipeline` (forced / VAP_ATTENTION_BACKEND / probed fastest).
        backend = choose_backend(device, self.dtype, forced=self.attention_backend)
        if backend != "native":
            model.set_attention_backend(backend)
        return model
