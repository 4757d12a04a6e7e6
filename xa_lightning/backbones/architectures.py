"""Architecture configs written in code: the real ones (``full_shape``) and tiny ones (``tiny``) per family.

The real configs are the published ``config.json`` values of runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-xl-base-1.0 and PixArt-alpha/PixArt-XL-2-1024-MS. Tiny configs keep each real
model's *structure* (number of UNet blocks and which carry cross-attention, SDXL's text_time embedding and two
text encoders, PixArt's learned-sigma output, vae_scale_factor 8, VAE scaling factors) at a size that trains on a
CPU: tiny SD1.5 has 16 cross-attention layers like the real one, latents are 8x8 (sd15, pixart_alpha) and
16x16 (sdxl), so X-Adapter sees the same 2x resolution pair as 512 -> 1024.
"""

from __future__ import annotations

from typing import Any

from .tokenizer import CLIP_VOCAB_SIZE

# ---------------------------------------------------------------------------------------------- schedulers
# Training noise schedules. SD1.5 (PNDMScheduler) and SDXL (EulerDiscreteScheduler) ship scaled_linear
# 0.00085..0.012 over 1000 steps, epsilon prediction. PixArt-alpha trains with IDDPM's linear schedule
# (1e-4..0.02, 1000 steps, learned sigma); diffusers' conversion script
# (huggingface/diffusers scripts/convert_pixart_alpha_to_diffusers.py) stores `DPMSolverMultistepScheduler()`,
# whose defaults are exactly beta_schedule="linear", beta_start=0.0001, beta_end=0.02, 1000 steps, epsilon.
SD15_SCHEDULER: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}
SDXL_SCHEDULER: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "sample_max_value": 1.0,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}
PIXART_SCHEDULER: dict[str, Any] = {
    "_class_name": "DPMSolverMultistepScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "lower_order_final": True,
}

# --------------------------------------------------------------------------------------------------- VAEs
_SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
}
SD15_VAE = {**_SD_VAE, "sample_size": 512, "scaling_factor": 0.18215}
# SDXL's VAE overflows in fp16; its config asks pipelines to upcast it.
SDXL_VAE = {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
PIXART_VAE = {**_SD_VAE, "sample_size": 512, "scaling_factor": 0.18215}  # sd-vae-ft-ema


def tiny_vae(sample_size: int, scaling_factor: float, force_upcast: bool = False) -> dict[str, Any]:
    """Four levels so vae_scale_factor is 8 like the real VAEs (pixel 64 -> latent 8)."""
    return {
        **_SD_VAE,
        "block_out_channels": [16, 32, 32, 32],
        "layers_per_block": 1,
        "norm_num_groups": 16,
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
        "force_upcast": force_upcast,
    }


# --------------------------------------------------------------------------------------------------- UNets
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,  # diffusers' legacy name: 8 heads per layer
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
    "act_fn": "silu",
}
TINY_SD15_UNET: dict[str, Any] = {
    **SD15_UNET,
    "sample_size": 8,
    "block_out_channels": [32, 32, 64, 64],
    "attention_head_dim": 2,
    "cross_attention_dim": 32,
}

SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,  # 768 (CLIP-L) + 1280 (OpenCLIP bigG) hidden states, concatenated
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled + 6 time ids * 256
    "norm_num_groups": 32,
    "act_fn": "silu",
}
_TINY_SDXL_TEXT_DIM = 32  # hidden size of each tiny text encoder and projection dim of the second
_TINY_SDXL_TIME_DIM = 8
TINY_SDXL_UNET: dict[str, Any] = {
    **SDXL_UNET,
    "sample_size": 16,
    "block_out_channels": [32, 64, 128],
    "transformer_layers_per_block": [1, 1, 2],
    "attention_head_dim": [1, 2, 4],
    "cross_attention_dim": 2 * _TINY_SDXL_TEXT_DIM,
    "addition_time_embed_dim": _TINY_SDXL_TIME_DIM,
    "projection_class_embeddings_input_dim": _TINY_SDXL_TEXT_DIM + 6 * _TINY_SDXL_TIME_DIM,
}

# ------------------------------------------------------------------------------------------ PixArt (DiT)
PIXART_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "num_layers": 28,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,  # learned sigma: eps + variance channels
    "patch_size": 2,
    "cross_attention_dim": 1152,
    "caption_channels": 4096,  # T5-v1.1-XXL d_model
    "attention_bias": True,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "use_additional_conditions": True,  # the 1024-MS model is conditioned on resolution and aspect ratio
}
_TINY_T5_DIM = 32
TINY_PIXART_TRANSFORMER: dict[str, Any] = {
    **PIXART_TRANSFORMER,
    "sample_size": 8,
    "num_layers": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "cross_attention_dim": 32,
    "caption_channels": _TINY_T5_DIM,
    "use_additional_conditions": False,  # like PixArt-XL-2-512x512
}

# ------------------------------------------------------------------------------------------ text encoders
# Our CLIP tokenizer puts <|endoftext|> at id 49407; CLIP pools at the first eos_token_id.
_CLIP_TOKENS = {"vocab_size": CLIP_VOCAB_SIZE, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
CLIP_L_TEXT: dict[str, Any] = {
    **_CLIP_TOKENS,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
OPEN_CLIP_BIGG_TEXT: dict[str, Any] = {
    **_CLIP_TOKENS,
    "pad_token_id": 0,  # SDXL's second tokenizer pads with "!"
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
TINY_CLIP_TEXT: dict[str, Any] = {
    **CLIP_L_TEXT,
    "hidden_size": _TINY_SDXL_TEXT_DIM,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 5,
    "projection_dim": _TINY_SDXL_TEXT_DIM,
}
TINY_OPEN_CLIP_TEXT: dict[str, Any] = {**TINY_CLIP_TEXT, "pad_token_id": 0, "hidden_act": "gelu"}

# T5-v1.1-XXL encoder (google/t5-v1_1-xxl). vocab_size is the CLIP tokenizer's 49408 instead of T5's 32128:
# offline we tokenize PixArt prompts with the CLIP BPE (see tokenizer.py), so ids go up to 49407. That adds
# 70.8 M embedding rows to the full-shape encoder; the compute per token is unchanged.
T5_XXL_ENCODER: dict[str, Any] = {
    "vocab_size": CLIP_VOCAB_SIZE,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.1,
    "is_encoder_decoder": False,
    "use_cache": False,
    "tie_word_embeddings": False,
    "pad_token_id": 49407,
    "eos_token_id": 49407,
    "decoder_start_token_id": 49407,
}
TINY_T5_ENCODER: dict[str, Any] = {
    **T5_XXL_ENCODER,
    "d_model": _TINY_T5_DIM,
    "d_kv": 8,
    "d_ff": 37,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
}

PIXART_MAX_LENGTH = 120  # PixArt-alpha's caption length
