"""Small Emu2-shaped model (~110M parameters) for CPU benchmarks: 224 px ViT (width 384, 6 blocks),
4x4 pooled connector, 8-layer LLaMA of width 768 with the full Emu2 vocabulary. Layers are
unrolled (`scan_layers=False`): at 6-8 layers compilation is quick, and on the CPU the scanned
stack's per-layer slicing and stacking cost about 5% of the step.

    python -m emu_jax.summary --config=configs/small.py
"""
from emu_jax import config_lib
from emu_jax import tokens as tokens_lib


def get_config(arg=None):
    config_lib.parse_variant(arg, ("base",))
    special, vocab = tokens_lib.emu2_tokens()
    config = config_lib.base_config(
        vit=config_lib.eva_clip_e_plus(image_size=224, patch_size=14, width=384, depth=6, num_heads=6,
                                       mlp_hidden=1536, scan_layers=False),
        connector=config_lib.pooled_connector(4),
        llm=config_lib.llama("33b", vocab, hidden=768, num_layers=8, num_heads=12, mlp_hidden=2048,
                             scan_layers=False),
        special_tokens=special)
    config.lock()
    return config
