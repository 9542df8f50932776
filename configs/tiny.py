"""Tiny Emu for a 2-core CPU: 32 px digits, patch 8, a 2-block ViT and a 2-layer LLaMA (width 128).

Variants: `configs/tiny.py` or `configs/tiny.py:emu2` (post-norm ViT, 2x2 pooled connector, GQA)
and `configs/tiny.py:emu1` (pre-norm ViT, 2-block Causal Transformer with 4 queries). Special
tokens follow the reference layout after a 512-piece sentencepiece vocabulary.

    python -m emu_jax.summary --config=configs/tiny.py
    python -m emu_jax.train --config=configs/tiny.py --workdir=/tmp/emu_tiny

Training runs 2500 steps of 16 packed rows x 128 tokens on the digits world, as Emu2's two
pretraining stages in one run: until step 1500 the text loss alone trains everything (the ViT
learns to see from scratch); from step 1500 the regression loss joins and the ViT is frozen, so
the regression targets stop moving (regressing onto a still-training encoder pulls it towards
predictable, less discriminative features: held-out caption accuracy 0.93 with regression weight
0.1 from the start, 0.97 with none). On the locked dependency set (constraints.txt), seed 0, with
videos laid out as Emu2's [VIDEO] + [gIMG] blocks, the run ended with held-out caption accuracy 0.908,
held-out text loss 0.249 and regression loss 0.446 (14.8 minutes on 2 cores shared with other jobs).
Earlier dependency sets gave 0.65 to 0.97 with the same recipe: its outcome is not yet robust (issue
"The quickstart keeps its promise").
"""
from emu_jax import config_lib
from emu_jax.models import tokens as tokens_lib

SP_VOCAB = 512


def get_config(arg=None):
    variant = config_lib.parse_variant(arg, ("emu2", "emu1"))
    vit = dict(image_size=32, patch_size=8, width=64, depth=2, num_heads=4, mlp_hidden=256, scan_layers=False)
    llm = dict(hidden=128, num_layers=2, num_heads=4, num_kv_heads=2, mlp_hidden=384, max_positions=512,
               scan_layers=False)
    if variant == "emu1":
        special, vocab = tokens_lib.emu1_tokens(base=SP_VOCAB)
        config = config_lib.base_config(
            vit=config_lib.eva_clip_g(**vit),
            connector=config_lib.causal_former(num_queries=4, d_model=64, num_layers=2, num_heads=4,
                                               head_dim=16, d_ff=128),
            llm=config_lib.llama("13b", vocab, **llm), special_tokens=special)
    else:
        special, vocab = tokens_lib.emu2_tokens(base=SP_VOCAB)
        config = config_lib.base_config(vit=config_lib.eva_clip_e_plus(**vit),
                                        connector=config_lib.pooled_connector(2, video_pool_grid=2),
                                        llm=config_lib.llama("33b", vocab, **llm), special_tokens=special)
    config.data = config_lib.digits_data(seq_len=128, max_images=8, video_frames=4, global_batch_size=16,
                                         packing_bins=8)
    config.loss.regression_from_step = 1500
    config.optimizer = config_lib.optimizer_config(learning_rate=2e-3, warmup_steps=100, weight_decay=0.01,
                                                   freeze_from=r"^vit/", freeze_from_step=1500)
    config.train = config_lib.train_config(steps=2500, log_every=50, eval_every=500, checkpoint_every=500,
                                           sample_every=500, final_eval="digit_captions")
    config.lock()
    return config
