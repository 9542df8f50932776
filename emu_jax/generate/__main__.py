"""Text and images from a trained or converted checkpoint.

    python -m emu_jax.generate --config=configs/tiny_decoder.py:decoder --checkpoint=/tmp/emu_tiny/checkpoints \\
        --decoder=/tmp/emu_decoder/checkpoints --prompt="a handwritten three [IMG]" --out=/tmp/generated
    python -m emu_jax.generate --config=configs/tiny.py --checkpoint=/tmp/emu_tiny/checkpoints \\
        --prompt="<image:digit.png>" --prompt="<image>question: what digit is this? answer:" --image=b.png
    python -m emu_jax.generate ... --prompts_file=prompts.jsonl --out=/tmp/answers   # {"prompt": ..., "images": [...]}

Prompt syntax: `<image:PATH>` / `<video:PATH>` place inputs, `<image>` takes the next --image, `[IMG]`
asks for an image there; a prompt not ending in `[IMG]` is answered with text (see
emu_jax/generate/prompts.py). Decoding settings live in the config: `--config.generate.strategy=beam
--config.generate.num_beams=5 --config.generate.length_penalty=-1 --config.generate.max_new_tokens=20`.
Prints each answer, writes images as PNGs (and `results.jsonl`) under --out, and reports tokens/s.
"""
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "The model's config (with model.unet/vae to decode images).",
                                lock_config=True)
flags.DEFINE_string("checkpoint", None, "Checkpoints directory of the Emu model (trained or converted).")
flags.DEFINE_string("decoder", "", "Checkpoints directory of the visual decoder (needed for [IMG]).")
flags.DEFINE_string("adapter", "", "Checkpoints directory of a LoRA run (config.model.lora) on --checkpoint's weights.")
flags.DEFINE_multi_string("prompt", [], "A prompt; repeat for a batch.")
flags.DEFINE_multi_string("image", [], "Images for the <image> placeholders, in order across prompts.")
flags.DEFINE_string("prompts_file", "", "JSON lines {\"prompt\": str, \"images\": [paths]} (instead of --prompt).")
flags.DEFINE_string("out", "", "Where images and results.jsonl go (images need it).")
flags.mark_flags_as_required(["config", "checkpoint"])


def read_prompts(FLAGS) -> list[tuple[str, list[str]]]:
    """(prompt, image paths for its <image> placeholders) pairs."""
    if FLAGS.prompts_file:
        rows = []
        with open(FLAGS.prompts_file) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    rows.append((str(row["prompt"]), list(row.get("images", []))))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise app.UsageError(f"{FLAGS.prompts_file}:{n}: expected {{\"prompt\": ..., \"images\": [...]}}: {e}")
        return rows
    if not FLAGS.prompt:
        raise app.UsageError("give --prompt (repeatable) or --prompts_file")
    paths, rows = list(FLAGS.image), []
    for prompt in FLAGS.prompt:
        count = prompt.count("<image>")
        rows.append((prompt, paths[:count]))
        paths = paths[count:]
    if paths:
        raise app.UsageError(f"{len(paths)} --image more than the prompts' <image> placeholders")
    return rows


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from emu_jax.generate import prompts as prompts_lib
    from emu_jax.models import lora
    try:
        generate(flags.FLAGS)
    except (prompts_lib.PromptError, FileNotFoundError, lora.LoraConfigError) as e:  # bad input: one line
        sys.exit(f"error: {e}")


def generate(FLAGS) -> None:
    import jax

    from emu_jax.data.media import encode_png
    from emu_jax.generate import generator as generator_lib, prompts as prompts_lib
    from emu_jax.parallel import interrupts, mesh as mesh_lib
    config = FLAGS.config
    mesh_lib.maybe_initialize_distributed(config)
    rows = read_prompts(FLAGS)
    size, frames = config.model.vit.image_size, config.data.video_frames
    batch = [prompts_lib.parse(p, size, [prompts_lib.load_image(i, size) for i in images], frames)
             for p, images in rows]
    if any(isinstance(s, prompts_lib.ImageRequest) for segments in batch for s in segments) and not (
            FLAGS.out and FLAGS.decoder):
        raise app.UsageError("the prompts ask for images ([IMG]): give --decoder and --out")
    generator = generator_lib.Generator.from_checkpoints(config, FLAGS.checkpoint, FLAGS.decoder, adapter=FLAGS.adapter)
    with interrupts.agreed_interrupts():  # Ctrl-C on any process stops them all between batches
        outputs = generator.generate(batch)  # every process of a multi-process run; process 0 writes and prints
    if jax.process_index():
        return
    results = []
    for n, ((prompt, _), out) in enumerate(zip(rows, outputs)):
        paths = []
        for j, image in enumerate(out.images):
            os.makedirs(FLAGS.out, exist_ok=True)
            paths.append(os.path.join(FLAGS.out, f"prompt{n}_image{j}.png"))
            with open(paths[-1], "wb") as f:
                f.write(encode_png(image))
        results.append({"prompt": prompt, "text": out.text, "images": paths})
        print(f"[{n}] {out.text}" + "".join(f" <{p}>" for p in paths))
    if FLAGS.out:
        os.makedirs(FLAGS.out, exist_ok=True)
        with open(os.path.join(FLAGS.out, "results.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    t = generator.timing
    print(f"text: {t.text_tokens} tokens in {t.text_seconds:.2f} s ({t.text_tokens / max(t.text_seconds, 1e-9):.1f} "
          f"tokens/s); image embeddings: {t.image_embeddings} in {t.image_seconds:.2f} s "
          f"({t.image_embeddings / max(t.image_seconds, 1e-9):.1f}/s); decoder: {t.decoder_seconds:.2f} s "
          f"(first calls include compilation)")


if __name__ == "__main__":
    app.run(main)
