"""Converters between the released PyTorch checkpoints (Emu, Emu2, Emu2-Chat, Emu2-Gen, Hugging
Face LLaMA, timm EVA-CLIP, diffusers UNet/VAE) and our Orbax checkpoints, in both directions.

    layouts   which source keys fill which of our parameters, and the tensor transforms
    tensors   streaming readers (safetensors, torch state dicts, sharded indexes) and writer
    plan      the whole conversion decided from names and shapes, strict errors
    importer  source -> sharded Orbax checkpoint (CLI: python -m emu_jax.convert import)
    exporter  Orbax checkpoint -> safetensors (CLI: python -m emu_jax.convert export)
"""
