"""Released weights <-> Orbax checkpoints.

    python -m emu_jax.convert import --config=configs/emu2_37b.py --layout=emu2_hf \\
        --source=/weights/Emu2/model.safetensors.index.json --out=/ckpt/emu2 --config.mesh.fsdp=8
    python -m emu_jax.convert export --config=configs/emu2_37b.py --layout=emu2 \\
        --checkpoint=/ckpt/emu2/checkpoints --out=/weights/emu2_export.safetensors
    python -m emu_jax.convert export --config=configs/emu1_14b.py:instruct --peft \\
        --adapter=/runs/emu_i_lora/checkpoints --out=/weights/emu_i_lora

`import` writes `<out>/checkpoints/0` (params sharded over the config's mesh; every process of a
multi-process run writes its own shards); the trainer takes it as
`--config.train.init_from.<tower>=<out>/checkpoints`. `export` writes one safetensors file, or
with `--max_shard_gb` a directory of shards plus the Hugging Face index. A LoRA run's adapters
(`--adapter`) are merged into the weights, or written unmerged where the layout wraps the
projection in peft LoRA (emu1_instruct), or with `--peft` alone as a peft adapter directory
(adapter_config.json + adapter_model.safetensors; `PeftModel.from_pretrained(model.decoder.lm, out)`).
Layouts:
{layouts}
"""
from absl import app, flags, logging
from ml_collections import config_flags

from emu_jax.convert.layouts import LAYOUTS

__doc__ = __doc__.format(layouts="\n".join(f"    {name:15s} {layout.describe}" for name, layout in LAYOUTS.items()))

config_flags.DEFINE_config_file("config", None, "The model the weights belong to, e.g. configs/emu2_37b.py.",
                                lock_config=True)
flags.DEFINE_enum("layout", None, sorted(LAYOUTS), "Key layout of the released checkpoint.")
flags.DEFINE_string("source", None, "import: a .safetensors / .bin / .pt file or a sharded index .json.")
flags.DEFINE_string("checkpoint", None, "export: the checkpoints directory to read (latest step).")
flags.DEFINE_string("out", None, "import: the output directory; export: a .safetensors path or a directory.")
flags.DEFINE_bool("strict", True, "import: fail on keys the layout does not know (junk is always dropped by name).")
flags.DEFINE_float("lora_alpha", None, "import: LoRA alpha for merging adapters (default: the layout's release "
                   "value, 16 for emu1_instruct; r is read from the adapters).")
flags.DEFINE_string("adapter", "", "export: a LoRA run's checkpoints (the config's model.lora), merged into "
                    "--checkpoint's weights.")
flags.DEFINE_bool("peft", False, "export: write --adapter's LLM adapters as a peft adapter directory at --out "
                  "(no --checkpoint or --layout needed).")
flags.DEFINE_string("dtype", None, "export: tensor dtype (default: the recorded source dtypes, else float32).")
flags.DEFINE_float("max_shard_gb", 0.0, "export: split into shards of at most this size, with an index JSON.")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
    from emu_jax.convert import plan, tensors
    from emu_jax.models import lora
    try:
        _run(argv)
    except (plan.ConversionError, tensors.SourceError, FileExistsError, FileNotFoundError, lora.LoraConfigError) as e:
        raise SystemExit(f"error: {e}") from None  # the message names the file and keys; no traceback


def _run(argv):
    if len(argv) != 2 or argv[1] not in ("import", "export"):
        raise app.UsageError("usage: python -m emu_jax.convert {import|export} --config=... --layout=... --out=...")
    logging.set_verbosity(logging.WARNING)
    from emu_jax.parallel import mesh as mesh_lib
    FLAGS, config = flags.FLAGS, flags.FLAGS.config
    if argv[1] == "export" and FLAGS.peft:
        if not FLAGS.adapter:
            raise app.UsageError("export --peft needs --adapter (a LoRA run's checkpoints)")
        from emu_jax.convert import exporter
        summary = exporter.export_peft(FLAGS.adapter, config, FLAGS.out, dtype=FLAGS.dtype or "float32")
        print(f"exported {summary['tensors']} adapter tensors ({summary['bytes'] / 2**20:.2f} MiB) to {FLAGS.out}")
        return
    if not FLAGS.layout:
        raise app.UsageError(f"{argv[1]} needs --layout")
    if argv[1] == "import":
        if not FLAGS.source:
            raise app.UsageError("import needs --source")
        from emu_jax.convert import importer, tensors
        mesh_lib.maybe_initialize_distributed(config)
        summary = importer.import_checkpoint(tensors.open_source(FLAGS.source), FLAGS.layout, config, FLAGS.out,
                                             mesh=mesh_lib.make_mesh(config.mesh), strict=FLAGS.strict,
                                             lora_alpha=FLAGS.lora_alpha)
        print(f"converted {summary['tensors']} tensors ({summary['bytes'] / 2**30:.2f} GiB) into "
              f"{summary['checkpoint']}; dropped {len(summary['dropped'])} keys our model does not use "
              f"({len(summary['carried'])} of them carried for export)")
    else:
        if not FLAGS.checkpoint:
            raise app.UsageError("export needs --checkpoint")
        from emu_jax.convert import exporter
        shard = int(FLAGS.max_shard_gb * 2**30) or None
        summary = exporter.export_checkpoint(FLAGS.checkpoint, FLAGS.layout, config, FLAGS.out, dtype=FLAGS.dtype,
                                             max_shard_bytes=shard, adapter_dir=FLAGS.adapter)
        print(f"exported {summary['tensors']} tensors ({summary['bytes'] / 2**30:.2f} GiB) to {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
