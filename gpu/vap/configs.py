"""The released checkpoint's configs: the VAP transformer, Wan2.1-I2V-14B's encoders and VAE,
the safety checker and the scheduler, as plain data (no torch: the geometry module, and through
it the API container, reads them).

`gpu.vap.released` builds the full-size models from them (meta device or random weights);
`gpu.vap.geometry` derives the latent grid and token counts from them.
"""

from __future__ import annotations

from typing import Any

# The released `ByteDance/Video-As-Prompt-Wan2.1-14B` transformer config (expert on every 4th block):
# the benchmark builds it with random weights, the tests and the parity check on the meta device.
RELEASED_14B_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 36,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "image_dim": 1280,
    "added_kv_proj_dim": 5120,
    "block_idx_with_mot_ref": list(range(0, 40, 4)),
}
# The Wan2.1 VAE: diffusers' `AutoencoderKLWan` defaults (a test holds them equal). Time is
# compressed 4x after the first frame, space 8x.
WAN_VAE_CONFIG: dict[str, Any] = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
}
# google/umt5-xxl encoder (Wan's text encoder).
UMT5_XXL_CONFIG: dict[str, Any] = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_encoder_decoder": False,
    "tie_word_embeddings": False,
}
# open-clip ViT-H/14 vision tower (Wan I2V's image encoder; hidden_states[-2] is used).
CLIP_VIT_H_CONFIG: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 1024,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}
# The SD safety checker: CLIP ViT-L/14 vision tower + projection + concept embeddings.
SAFETY_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "hidden_act": "quick_gelu",
}
SCHEDULER_CONFIG: dict[str, Any] = {
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "num_train_timesteps": 1000,
    "flow_shift": 3.0,
}
