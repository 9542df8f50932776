"""Tiny visual decoder for a 2-core CPU: a 32 px VAE (latents 8x8x4) and an SDXL-shaped UNet
(linear projections, pooled "text_time" input) conditioned on the tiny Emu2's visual encoder.

Two stages in the same trainer, the VAE first (the embedded default has no pretrained VAE):

    python -m emu_jax.train --config=configs/tiny_decoder.py:vae --workdir=/tmp/emu_vae
    python -m emu_jax.train --config=configs/tiny_decoder.py:decoder --workdir=/tmp/emu_decoder \\
        --config.train.init_from.vae=/tmp/emu_vae/checkpoints \\
        --config.train.init_from.vit=/tmp/emu_tiny/checkpoints --config.train.init_from.connector=/tmp/emu_tiny/checkpoints

The decoder stage freezes the VAE and the visual encoder (init_from a tiny Emu run, as Emu2 does;
without one the encoder keeps its random initialisation) and trains the UNet with an EMA of its
weights. Each stage ends by printing the recognisability of its held-out outputs: the fraction
an independent digit classifier (an SVM fit on sklearn's real digits; 0.983 on the real held-out
digits) labels as the source digit; the VAE stage also prints its latents' standard deviation.

Two settings carry the figures. `scaling_factor=0.2`: the tiny VAE's latents have std 5.0 (mean
2.5) on held-out digits, and the diffusion schedule assumes unit variance (SD1.5's 0.18215 is
measured the same way); at 1.0 the UNet's samples started 5x off the noise they were trained on
and came out grey and blurred (seed 0: 0.775 -> 0.983). `image_documents_where={"view": 0}`, no
augmentation: the UNet redraws the digits world's original images only, not its fixed extra views,
which the encoder (trained on random views, blind to their pose) cannot tell apart (0.708 -> 0.775
before the scaling fix; random views for the decoder too: 0.475). Measured by `python
benchmarks/readme_figures.py --stages=decoder` on constraints.txt (README table), each seed's
stages on that seed's quickstart encoder: UNet stage 0.958 for seed 0 (4500 steps, EMA 0.99, Euler
25 steps, guidance 4; 10.2 minutes), the other seeds in the README table.
"""
import os

from emu_jax import config_lib


def get_config(arg=None):
    stage = config_lib.parse_variant(arg, ("vae", "decoder"))
    config = config_lib.load(os.path.join(os.path.dirname(__file__), "tiny.py") + ":emu2")
    with config.unlocked():
        config.task = stage
        config.model.vae = config_lib.vae(block_out_channels=(16, 32, 32), layers_per_block=1, groups=8,
                                          scaling_factor=0.2)
        config.model.unet = config_lib.sdxl_unet(block_out_channels=(32, 64), cross_attention=(True, True),
                                                 transformer_depth=(1, 1), num_heads=(4, 4), layers_per_block=1,
                                                 groups=8, addition_time_embed_dim=32)
        config.model.decoder = config_lib.decoder_options(image_size=32, sampler="euler", sampler_steps=25,
                                                          guidance=4.0, condition_dropout=0.1, autoencode=True)
        config.loss = config_lib.ml_collections.ConfigDict(dict(kl_weight=1e-4))
        config.stages = {}  # the Emu recipe's stages are not the decoder's
        config.data.global_batch_size = 16
        config.data.augment.kind = "none"
        config.data.image_documents_where = {"view": 0}
        config.train.init_from.vae = ""
        if stage == "vae":
            config.optimizer = config_lib.optimizer_config(learning_rate=1e-3, warmup_steps=100, weight_decay=0.0,
                                                           freeze=r"^(vit|connector|unet)/")
            config.train = config_lib.train_config(steps=800, log_every=50, eval_every=400, checkpoint_every=400,
                                                   init_from=config.train.init_from)
            config.evals = {"digits": config_lib.evaluator("recognisability", count=360),
                            "latents": config_lib.evaluator("latent_std", count=360),
                            "samples": config_lib.evaluator("reconstructions", every=400, final=False, count=8)}
        else:
            config.optimizer = config_lib.optimizer_config(learning_rate=1e-3, warmup_steps=100, weight_decay=0.0,
                                                           freeze=r"^(vit|connector|vae)/")
            config.train = config_lib.train_config(steps=4500, log_every=50, eval_every=1500, checkpoint_every=1500,
                                                   ema_decay=0.99, init_from=config.train.init_from)
            config.evals = {"digits": config_lib.evaluator("recognisability", count=120),
                            "samples": config_lib.evaluator("reconstructions", every=1500, final=False, count=8)}
    config.lock()
    return config
