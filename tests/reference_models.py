"""Independent PyTorch implementations of every tower (transformers, timm, diffusers), shaped like
the tiny configs and randomly initialised. Each tower's converter is tested against these; whole
release files come from the official release's own classes (`tests/release_models.py`)."""
from __future__ import annotations

import numpy as np
import torch


def seeded(seed: int):
    torch.manual_seed(seed)
    return np.random.RandomState(seed)


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (zero-initialised biases, unit norms and layer scales would hide
    transposition and naming mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / float(np.prod(p.shape[1:])) ** 0.5)
            else:
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
    return module.eval()


def llama(llm_config, vocab_size: int, seed: int = 0):
    """transformers' LlamaForCausalLM with the shape of our `config.model.llm`."""
    from transformers import LlamaConfig, LlamaForCausalLM
    heads = llm_config.num_heads
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=llm_config.hidden, intermediate_size=llm_config.mlp_hidden,
                      num_hidden_layers=llm_config.num_layers, num_attention_heads=heads,
                      num_key_value_heads=llm_config.num_kv_heads or heads, rms_norm_eps=llm_config.norm_eps,
                      max_position_embeddings=llm_config.max_positions, tie_word_embeddings=False,
                      rope_theta=llm_config.rope_theta, attn_implementation="eager")
    return _randomise(LlamaForCausalLM(cfg), seed)


def eva(vit_config, seed: int = 0):
    """timm's Eva with EVA-CLIP's attention (fused qkv, q/v biases), no rope, no final norm."""
    from timm.models.eva import Eva
    model = Eva(img_size=vit_config.image_size, patch_size=vit_config.patch_size, embed_dim=vit_config.width,
                depth=vit_config.depth, num_heads=vit_config.num_heads,
                mlp_ratio=vit_config.mlp_hidden / vit_config.width, qkv_bias=True, qkv_fused=True,
                use_post_norm=bool(vit_config.post_norm), use_post_transformer_norm=False, num_classes=0,
                global_pool="", use_rot_pos_emb=False)
    return _randomise(model, seed)


class _QueriesStackProjection(torch.nn.Module):
    """`cformer`: learned queries -> T5 decoder stack -> projection."""

    def __init__(self, connector_config, vision_width: int, llm_hidden: int):
        super().__init__()
        from transformers import T5Config
        from transformers.models.t5.modeling_t5 import T5Stack
        c = connector_config
        cfg = T5Config(d_model=c.d_model, d_kv=c.head_dim, d_ff=c.d_ff, num_layers=c.num_layers,
                       num_decoder_layers=c.num_layers, num_heads=c.num_heads,
                       relative_attention_num_buckets=c.num_buckets, relative_attention_max_distance=c.max_distance,
                       dropout_rate=0.0, layer_norm_epsilon=c.norm_eps, feed_forward_proj="relu", is_decoder=True,
                       use_cache=False, is_encoder_decoder=False)
        self.causal_tokens = torch.nn.Parameter(torch.zeros(1, c.num_queries, c.d_model))
        self.cformer = T5Stack(cfg)
        for block in self.cformer.block:  # Emu1's cross-attention reads ViT-width tokens
            cross = block.layer[1].EncDecAttention
            cross.k = torch.nn.Linear(vision_width, c.num_heads * c.head_dim, bias=False)
            cross.v = torch.nn.Linear(vision_width, c.num_heads * c.head_dim, bias=False)
        self.projection = torch.nn.Linear(c.d_model, llm_hidden)

    def forward(self, vision):
        queries = self.causal_tokens.expand(vision.shape[0], -1, -1)
        return self.projection(self.cformer(inputs_embeds=queries, encoder_hidden_states=vision).last_hidden_state)


class CausalFormerReference(torch.nn.Module):
    """Emu1's connector built on transformers' T5 decoder stack; its state dict keys are the
    release's (`ln_visual.*`, `cformer.causal_tokens`, `cformer.cformer.block...`, `cformer.projection.*`)."""

    def __init__(self, connector_config, vision_width: int, llm_hidden: int):
        super().__init__()
        self.ln_visual = torch.nn.LayerNorm(vision_width, eps=connector_config.ln_visual_eps)
        self.cformer = _QueriesStackProjection(connector_config, vision_width, llm_hidden)

    def forward(self, vit_tokens):
        return self.cformer(self.ln_visual(vit_tokens))


def unet(unet_config, cross_attention_dim: int, seed: int = 0):
    """diffusers' UNet2DConditionModel with the shape of our `config.model.unet`."""
    from diffusers import UNet2DConditionModel
    c = unet_config
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in c.cross_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(c.cross_attention))
    extra = {}
    if c.addition_time_embed_dim:
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=c.addition_time_embed_dim,
                     projection_class_embeddings_input_dim=cross_attention_dim + 6 * c.addition_time_embed_dim)
    model = UNet2DConditionModel(
        sample_size=8, in_channels=c.in_channels, out_channels=c.out_channels, down_block_types=down,
        up_block_types=up, mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=tuple(c.block_out_channels),
        layers_per_block=c.layers_per_block, transformer_layers_per_block=tuple(c.transformer_depth),
        attention_head_dim=tuple(c.num_heads), cross_attention_dim=cross_attention_dim,
        norm_num_groups=c.groups, norm_eps=c.norm_eps, use_linear_projection=c.linear_projection,
        flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=int(c.freq_shift), **extra)
    return _randomise(model, seed)


def vae(vae_config, seed: int = 0):
    from diffusers import AutoencoderKL
    c = vae_config
    model = AutoencoderKL(block_out_channels=tuple(c.block_out_channels),
                          down_block_types=("DownEncoderBlock2D",) * len(c.block_out_channels),
                          up_block_types=("UpDecoderBlock2D",) * len(c.block_out_channels),
                          layers_per_block=c.layers_per_block, latent_channels=c.latent_channels,
                          norm_num_groups=c.groups, scaling_factor=c.scaling_factor)
    return _randomise(model, seed)


def prefixed(prefix: str, module: torch.nn.Module) -> dict:
    return {prefix + k: v.detach().clone() for k, v in module.state_dict().items()}
