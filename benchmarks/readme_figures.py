"""The README's result tables, measured by running the commands the README gives users:

    python benchmarks/readme_figures.py                         # quickstart x 3 seeds, decoder, chat, gen, sweep
    python benchmarks/readme_figures.py --label=newest --stages=quickstart   # from a virtualenv of the newest releases

Stages (each run is a subprocess of the CLI a user types, one at a time: they use every core):
  quickstart  `python -m emu_jax.train --config=configs/tiny.py` per seed (`--config.seed` and
              `--config.data.seed`): held-out caption accuracy, held-out text loss, wall time
  decoder     `configs/tiny_decoder.py:vae`, then `:decoder` on that seed's quickstart encoder:
              held-out recognisability of each stage, wall times
  chat        `configs/tiny_chat.py` on that seed's quickstart checkpoints (digits-world conversations
              from `python -m emu_jax.data.digits_chat` and `data.write conversations`), with
              `--config.train.steps=0` first: held-out chat and grounding accuracy, untuned and tuned
  gen         `configs/tiny_gen.py`: `:vae` and `:decoder` (that seed's tiny decoder continued on the
              canvases of `python -m emu_jax.data.digits_gen`), then `:full` from that seed's quickstart
              checkpoints (the encoder the canvas decoder's), untuned (`--config.train.steps=0`) and tuned: where the held-out canvases' digit
              is drawn (crop classified as the digit, ink centre in the box)
  sweep       `python -m emu_jax.evaluate --config=configs/eval/digits.py` on seed 0's checkpoints
  benchmarks  each `python benchmarks/<name>.py` with its defaults: the lines it prints (ratios
              measured side by side in one run), verbatim

A finished run leaves `<out>/<label>/<run>.json` (its figures, wall time, and the versions of the
packages it ran on; committed) and its workdir under `--work`, so a re-run only runs what is missing
and the tables gather every label measured so far (`locked`, the constraints.txt set, beside
`newest`; `locked-epyc`, the constraints.txt set on another kind of CPU). The tables are written between
the README's `<!-- figures:<table>:begin -->` / `<!-- figures:<table>:end -->` markers.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

import readme_section

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "pillow", "sentencepiece",
            "tensorflow-datasets")
STAGES = ("quickstart", "decoder", "chat", "gen", "sweep", "benchmarks")
# each benchmark -> the start of the first line it prints itself (TFDS and the official release's tokenizer
# print before it; the README shows the benchmark's own lines)
BENCHMARKS = {"pipeline_throughput": "raw PIL", "train_step_flops": "device:", "train_loop": "device:",
              "generate_speed": "device:",
              "convert_throughput": "checkpoint:", "t2i_vs_official": "prompt "}


# the vector units XLA's CPU code generator targets: the same run on another kind of CPU rounds differently
# and, the recipes being chaotic at rounding level, ends at different figures
CPU_UNITS = ("amx_bf16", "avx512f", "avx2")


def cpu() -> str:
    """The processor's model and the widest of CPU_UNITS it has (Linux; elsewhere the platform's word)."""
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(tuple(part.strip() for part in line.split(":", 1)) for line in info.splitlines()[:40] if ":" in line)
    widest = next((unit for unit in CPU_UNITS if unit in fields.get("flags", "").split()), "no avx2")
    return f"{fields.get('model name', platform.machine())}, {widest.split('_')[0]}"


def versions() -> dict:
    found = {p: importlib.metadata.version(p) for p in PACKAGES}
    return dict(found, python=platform.python_version(), cpus=os.cpu_count(), cpu=cpu(),
                date=datetime.date.today().isoformat())


def last_metric(workdir: pathlib.Path, name: str) -> float:
    """The last value of `name` in a run's metrics.jsonl."""
    values = [json.loads(line)[name] for line in open(workdir / "metrics.jsonl") if f'"{name}"' in line]
    if not values:
        raise RuntimeError(f"{workdir}/metrics.jsonl has no {name}")
    return values[-1]


def run_cli(args: list[str], log: pathlib.Path) -> float:
    """Runs `python -m <args>` from the repository root; returns its wall time in seconds."""
    start = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as stream:
        done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT,
                              check=False)
    if done.returncode:
        raise RuntimeError(f"`{' '.join(args)}` failed; see {log}")
    return time.perf_counter() - start


def measured(result: pathlib.Path, run_dir: pathlib.Path, measure, needs: tuple[pathlib.Path, ...] = ()) -> dict:
    """The run's figures from `result` (json), measuring them in `run_dir` first if the run has not
    finished or if what a later stage `needs` of it (a checkpoint) is gone. The run starts from an
    empty `run_dir`: a killed run's checkpoints would otherwise be resumed, and its wall time would be
    a fraction of a run's."""
    if not result.exists() or not all(p.exists() for p in needs):
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        figures = measure(run_dir) | {"versions": versions()}
        result.parent.mkdir(parents=True, exist_ok=True)
        result.with_suffix(".tmp").write_text(json.dumps(figures, indent=1) + "\n")
        os.replace(result.with_suffix(".tmp"), result)
    return json.loads(result.read_text())


def train(run_dir: pathlib.Path, config: str, overrides: list[str]) -> float:
    workdir = run_dir / "workdir"
    return run_cli(["emu_jax.train", f"--config={config}", f"--workdir={workdir}", *overrides], run_dir / "log.txt")


def quickstart(results: pathlib.Path, work: pathlib.Path, seed: int, needs_checkpoint: bool = False) -> dict:
    run_dir = work / f"quickstart_seed{seed}"

    def measure(run_dir):
        wall = train(run_dir, "configs/tiny.py", [f"--config.seed={seed}", f"--config.data.seed={seed}"])
        workdir = run_dir / "workdir"
        # evaluators log percentages; the tables show fractions, as the targets are written
        return dict(seed=seed, accuracy=last_metric(workdir, "eval/captions/accuracy") / 100,
                    text_loss=last_metric(workdir, "eval/text_loss"), wall_s=wall)
    needs = (run_dir / "workdir" / "checkpoints",) if needs_checkpoint else ()
    return measured(results / f"quickstart_seed{seed}.json", run_dir, measure, needs)


def decoder(results: pathlib.Path, work: pathlib.Path, seed: int, needs_checkpoint: bool = False) -> dict:
    encoder = work / f"quickstart_seed{seed}" / "workdir" / "checkpoints"
    run_dir = work / f"decoder_seed{seed}"

    def measure(run_dir):
        quickstart(results, work, seed, needs_checkpoint=True)
        seeds = [f"--config.seed={seed}", f"--config.data.seed={seed}"]
        vae_wall = train(run_dir / "vae", "configs/tiny_decoder.py:vae", seeds)
        vae = run_dir / "vae" / "workdir"
        wall = train(run_dir / "decoder", "configs/tiny_decoder.py:decoder", seeds + [
            f"--config.train.init_from.vae={vae}/checkpoints", f"--config.train.init_from.vit={encoder}",
            f"--config.train.init_from.connector={encoder}"])
        return dict(seed=seed, vae=last_metric(vae, "eval/digits/recognisability") / 100, vae_wall_s=vae_wall,
                    vae_latent_std=last_metric(vae, "eval/latents/latent_std"),
                    decoder=last_metric(run_dir / "decoder" / "workdir", "eval/digits/recognisability") / 100,
                    decoder_wall_s=wall)
    needs = (run_dir / "decoder" / "workdir" / "checkpoints",) if needs_checkpoint else ()
    return measured(results / f"decoder_seed{seed}.json", run_dir, measure, needs)


def chat_data(work: pathlib.Path) -> pathlib.Path:
    """The digits-world conversations as a user's LLaVA file, written into shards (once per label)."""
    data = work / "chat_data"
    if not list(data.glob("train-*.array_record")):
        run_cli(["emu_jax.data.digits_chat", f"--out={data}"], work / "chat_data_log.txt")
        run_cli(["emu_jax.data.write", "conversations", f"--input={data}/train.json", f"--output={data}/train"],
                work / "chat_data_write_log.txt")
    return data


def trainable_share(config: str) -> tuple[int, int]:
    """(adapter parameters, all parameters) of a LoRA config's model."""
    import flax.linen as nn
    import jax
    from emu_jax import config_lib
    from emu_jax.models import families, lora
    model_config = config_lib.load(str(ROOT / config)).model
    family = families.of(model_config)
    model = family.build(model_config)
    params = jax.eval_shape(lambda kw: model.init(jax.random.key(0), **kw)["params"], family.example_inputs(model))
    return lora.count(nn.unbox(params))


def chat(results: pathlib.Path, work: pathlib.Path, seed: int) -> dict:
    def measure(run_dir):
        quickstart(results, work, seed, needs_checkpoint=True)
        base = work / f"quickstart_seed{seed}" / "workdir" / "checkpoints"
        flags = [f"--config.seed={seed}", f"--config.data.seed={seed}",
                 f"--config.data.train_sources.chat.path={chat_data(work)}/train-*.array_record",
                 *(f"--config.train.init_from.{tower}={base}" for tower in ("vit", "connector", "llm"))]
        train(run_dir / "zero_shot", "configs/tiny_chat.py", flags + ["--config.train.steps=0"])
        wall = train(run_dir / "tuned", "configs/tiny_chat.py", flags)
        adapters, total = trainable_share("configs/tiny_chat.py")
        figures = {f"{name}_{when}": last_metric(run_dir / when / "workdir", f"eval/{metric}") / 100
                   for when in ("zero_shot", "tuned")
                   for name, metric in (("chat", "chat/accuracy"), ("grounding", "grounding/accuracy"),
                                        ("grounding_iou", "grounding/mean_iou"))}
        return dict(figures, seed=seed, wall_s=wall, adapters=adapters, parameters=total)
    return measured(results / f"chat_seed{seed}.json", work / f"chat_seed{seed}", measure)


def gen_data(work: pathlib.Path) -> pathlib.Path:
    """The digits-world generation examples as a user's JSONL, written into shards (once per label)."""
    data = work / "gen_data"
    if not list(data.glob("canvases_test-*.array_record")):
        run_cli(["emu_jax.data.digits_gen", f"--out={data}"], work / "gen_data_log.txt")
        for split in ("train", "test"):
            for kind, name, jsonl in (("generation", "gen", f"{split}.jsonl"), ("pairs", "canvases",
                                                                             f"{split}-canvases.jsonl")):
                run_cli(["emu_jax.data.write", kind, f"--input={data / jsonl}", f"--output={data}/{name}_{split}"],
                        work / f"gen_data_write_{name}_{split}_log.txt")
    return data


def gen_sources(data: pathlib.Path, name: str) -> list[str]:
    return [f"--config.data.{kind}_sources.{name}.path={data}/{name}_{split}-*.array_record"
            for kind, split in (("train", "train"), ("eval", "test"))]


def gen(results: pathlib.Path, work: pathlib.Path, seed: int) -> dict:
    def measure(run_dir):
        decoder(results, work, seed, needs_checkpoint=True)
        data = gen_data(work)
        base = work / f"quickstart_seed{seed}" / "workdir" / "checkpoints"
        tiny_decoder = work / f"decoder_seed{seed}"
        canvas_vae, canvas_decoder = run_dir / "vae" / "workdir", run_dir / "decoder" / "workdir"
        seeds = [f"--config.seed={seed}", f"--config.data.seed={seed}"]
        vae_wall = train(run_dir / "vae", "configs/tiny_gen.py:vae", seeds + gen_sources(data, "canvases") + [
            f"--config.train.init_from.vae={tiny_decoder}/vae/workdir/checkpoints"])
        decoder_wall = train(run_dir / "decoder", "configs/tiny_gen.py:decoder", seeds + gen_sources(data, "canvases") + [
            f"--config.train.init_from.vae={canvas_vae}/checkpoints",
            f"--config.train.init_from.unet={tiny_decoder}/decoder/workdir/checkpoints",
            f"--config.train.init_from.vit={base}", f"--config.train.init_from.connector={base}"])
        flags = seeds + gen_sources(data, "gen") + [
            *(f"--config.train.init_from.{tower}={base}" for tower in ("connector", "llm")),
            *(f"--config.{key}={canvas_decoder}/checkpoints" for key in ("train.init_from.vit", "evals.generation.decoder"))]
        train(run_dir / "zero_shot", "configs/tiny_gen.py:full", flags + ["--config.train.steps=0"])
        wall = train(run_dir / "tuned", "configs/tiny_gen.py:full", flags)
        figures = {f"{stage}_{metric}": last_metric(run_dir / stage / "workdir", f"eval/canvases/{metric}") / 100
                   for stage in ("vae", "decoder") for metric in ("crop_accuracy", "in_box")}
        figures |= {f"{when}_{metric}": last_metric(run_dir / when / "workdir", f"eval/generation/{metric}") / 100
                    for when in ("zero_shot", "tuned") for kind in ("", "grounded_", "subject_")
                    for metric in (f"{kind}crop_accuracy", f"{kind}in_box")}
        return dict(figures, seed=seed, wall_s=wall, vae_wall_s=vae_wall, decoder_wall_s=decoder_wall)
    return measured(results / f"gen_seed{seed}.json", work / f"gen_seed{seed}", measure)


def sweep(results: pathlib.Path, work: pathlib.Path) -> dict:
    def measure(run_dir):
        quickstart(results, work, 0, needs_checkpoint=True)
        decoder(results, work, 0, needs_checkpoint=True)
        tiny, dec = work / "quickstart_seed0" / "workdir", work / "decoder_seed0" / "decoder" / "workdir"
        wall = run_cli(["emu_jax.evaluate", "--config=configs/eval/digits.py", f"--config.out={run_dir / 'sweep'}",
                        f"--config.checkpoints.tiny.checkpoint={tiny}/checkpoints",
                        f"--config.checkpoints.tiny.decoder={dec}/checkpoints"], run_dir / "log.txt")
        with open(run_dir / "sweep" / "results.csv") as f:
            return dict(rows=list(csv.DictReader(f)), wall_s=wall)
    return measured(results / "sweep.json", work / "sweep", measure)


def benchmark(results: pathlib.Path, work: pathlib.Path, name: str) -> dict:
    def measure(run_dir):
        log = run_dir / "log.txt"
        start = time.perf_counter()
        done = subprocess.run([sys.executable, f"benchmarks/{name}.py"], cwd=ROOT, capture_output=True, text=True,
                              check=False)
        log.write_text(done.stdout + done.stderr)
        if done.returncode:
            raise RuntimeError(f"benchmarks/{name}.py failed; see {log}")
        return dict(name=name, printed=done.stdout.strip().splitlines(), wall_s=time.perf_counter() - start)
    return measured(results / f"benchmark_{name}.json", work / f"benchmark_{name}", measure)


def gathered(out: pathlib.Path, pattern: str) -> list[tuple[str, dict]]:
    """(label, figures) of every finished run matching `pattern` under every label."""
    return [(path.parent.name, json.loads(path.read_text())) for path in sorted(out.glob(f"*/{pattern}.json"))]


def versions_line(label: str, v: dict) -> str:
    packages = ", ".join(f"{p} {v[p]}" for p in PACKAGES)
    cpu_kind = f" ({v['cpu']})" if "cpu" in v else ""
    return f"`{label}`: {packages}; Python {v['python']}, {v['cpus']} CPUs{cpu_kind}, {v['date']}"


def footnotes(runs: list[tuple[str, dict]]) -> list[str]:
    """Each label's versions, with every date its runs in the table ran on."""
    seen, dates = {}, {}
    for label, figures in runs:
        seen.setdefault(label, figures["versions"])
        dates.setdefault(label, set()).add(figures["versions"]["date"])
    return [""] + [versions_line(label, dict(v, date=", ".join(sorted(dates[label])))) + "  "
                   for label, v in seen.items()]


def seed_table(out: pathlib.Path, pattern: str, columns: list[str], cells, extra: tuple[str, ...] = ()) -> str:
    """A table with a row per finished run matching `pattern` (dependency set, seed, `cells(figures)`),
    then `extra` rows and the versions each dependency set ran on."""
    runs = gathered(out, pattern)
    if not runs:
        return ""
    head = ["dependency set", "seed", *columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([label, str(f["seed"]), *cells(f)]) + " |" for label, f in runs]
    return "\n".join(lines + list(extra) + footnotes(runs))


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def quickstart_table(out: pathlib.Path) -> str:
    return seed_table(out, "quickstart_seed*", ["held-out caption accuracy", "held-out text loss",
                                                "wall time (2 cores)"],
                      lambda f: [f"{f['accuracy']:.3f}", f"{f['text_loss']:.3f}", minutes(f["wall_s"])])


def real_digits_recognisability() -> float:
    """The classifier's accuracy on the real held-out digits: the ceiling for generated ones."""
    from emu_jax.data import digits
    from emu_jax.eval import recognisability
    images, labels = digits.load_digits()
    held_out = digits.split_indices(len(images), "test")
    return recognisability.digit_accuracy(images[held_out], list(labels[held_out]))


def decoder_table(out: pathlib.Path) -> str:
    if not gathered(out, "decoder_seed*"):
        return ""
    return seed_table(out, "decoder_seed*", ["VAE recognisability", "VAE latent std", "VAE wall time",
                                             "decoder recognisability", "decoder wall time"],
                      lambda f: [f"{f['vae']:.3f}", f"{f['vae_latent_std']:.2f}", minutes(f["vae_wall_s"]),
                                 f"{f['decoder']:.3f}", minutes(f["decoder_wall_s"])],
                      extra=(f"| real held-out digits | | {real_digits_recognisability():.3f} | | | | |",))


def chat_table(out: pathlib.Path) -> str:
    return seed_table(out, "chat_seed*", ["chat accuracy: untuned -> tuned", "grounding (IoU >= 0.5): untuned -> tuned",
                                          "grounding mean IoU, tuned", "trainable parameters", "wall time (2 cores)"],
                      lambda f: [f"{f['chat_zero_shot']:.3f} -> **{f['chat_tuned']:.3f}**",
                                 f"{f['grounding_zero_shot']:.3f} -> {f['grounding_tuned']:.3f}",
                                 f"{f['grounding_iou_tuned']:.3f}",
                                 f"{f['adapters']:,} of {f['parameters']:,} ({f['adapters'] / f['parameters']:.1%})",
                                 minutes(f["wall_s"])])


def gen_table(out: pathlib.Path) -> str:
    def cells(f):
        return [f"{f['vae_crop_accuracy']:.3f} / {f['vae_in_box']:.3f}",
                f"{f['decoder_crop_accuracy']:.3f} / {f['decoder_in_box']:.3f}",
                f"{f['zero_shot_crop_accuracy']:.3f} / {f['zero_shot_in_box']:.3f}",
                f"**{f['tuned_crop_accuracy']:.3f}** / **{f['tuned_in_box']:.3f}**",
                f"{f['tuned_grounded_crop_accuracy']:.3f} / {f['tuned_grounded_in_box']:.3f}",
                f"{f['tuned_subject_crop_accuracy']:.3f} / {f['tuned_subject_in_box']:.3f}",
                minutes(f["vae_wall_s"] + f["decoder_wall_s"]), minutes(f["wall_s"])]
    return seed_table(out, "gen_seed*", ["canvas VAE", "canvas decoder", "generation untuned", "generation tuned",
                                         "tuned: grounded", "tuned: subject", "decoder stages wall", "tuning wall"],
                      cells)


SWEEP_ROWS = (  # (README row, task, demonstrations, metric columns joined by " / ")
    ("caption accuracy", "caption", "none", ("accuracy",)),
    ("VQA accuracy (\"what digit is this?\")", "vqa", "none", ("accuracy",)),
    ("in-context labelling, random demonstrations", "labelling", "random", ("accuracy",)),
    ("in-context labelling, RICES demonstrations", "labelling", "rices", ("accuracy",)),
    ("video caption accuracy: digit and direction / digit / direction", "video", "none",
     ("accuracy", "digit_accuracy", "direction_accuracy")),
    ("text-to-image: classifier accuracy / FID (encoder features)", "t2i", "none", ("accuracy", "FID")),
)


def sweep_cell(rows: list[dict], task: str, demonstrations: str, shots: int, metrics) -> str:
    for r in rows:
        if r["task"] == task and int(r["shots"]) == shots and r["demonstrations"] in (demonstrations, "none"):
            return " / ".join(f"{float(r[m]):.2f}" if m == "FID" else f"{float(r[m]):.1f}" for m in metrics)
    return ""


def sweep_table(out: pathlib.Path) -> str:
    runs = gathered(out, "sweep")
    if not runs:
        return ""
    label, figures = runs[0]
    shots = sorted({int(r["shots"]) for r in figures["rows"]})
    lines = ["| task | " + " | ".join(f"{k}-shot" if k == 0 else str(k) for k in shots) + " |",
             "|---|" + "---|" * len(shots)]
    for name, task, demonstrations, metrics in SWEEP_ROWS:
        lines.append(f"| {name} | " + " | ".join(sweep_cell(figures["rows"], task, demonstrations, k, metrics)
                                                for k in shots) + " |")
    return "\n".join(lines + footnotes(runs[:1]))


def benchmarks_table(out: pathlib.Path) -> str:
    runs = gathered(out, "benchmark_*")
    if not runs:
        return ""
    blocks, order = [], list(BENCHMARKS)
    for label, figures in sorted(runs, key=lambda run: order.index(run[1]["name"])):
        printed = figures["printed"]
        own = next(i for i, line in enumerate(printed) if line.startswith(BENCHMARKS[figures["name"]]))
        blocks += [f"`python benchmarks/{figures['name']}.py` ({label}):", "", "```", *printed[own:], "```", ""]
    return "\n".join(blocks + footnotes(runs)[1:])


TABLES = {"quickstart": quickstart_table, "decoder": decoder_table, "chat": chat_table, "gen": gen_table,
          "sweep": sweep_table,
          "benchmarks": benchmarks_table}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="locked",
                        help="Names the dependency set (and, where it differs, the machine) these runs use.")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "figures"), help="Where the figures go (json).")
    parser.add_argument("--work", default="~/.cache/emu_jax/figures", help="Where the runs go (workdirs, logs).")
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    parser.add_argument("--tables_only", action="store_true", help="Rewrite the tables from finished runs only.")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    stages = args.stages.split(",")
    if not args.tables_only:
        results, work = out / args.label, pathlib.Path(args.work).expanduser() / args.label
        seeds = [int(s) for s in args.seeds.split(",")]
        for seed in seeds if "quickstart" in stages else ():
            quickstart(results, work, seed)
        for seed in seeds if "decoder" in stages else ():
            decoder(results, work, seed)
        for seed in seeds if "chat" in stages else ():
            chat(results, work, seed)
        for seed in seeds if "gen" in stages else ():
            gen(results, work, seed)
        if "sweep" in stages:
            sweep(results, work)
        for name in BENCHMARKS if "benchmarks" in stages else ():
            benchmark(results, work, name)
    for name, table in TABLES.items():
        markdown = table(out)
        print(markdown, end="\n\n")
        if markdown:
            readme_section.rewrite(args.readme, f"figures:{name}", markdown)


if __name__ == "__main__":
    main()
