"""The README's TPU tables: configs on a few slices, fitted and estimated by the ahead-of-time
compile entry, run as a user would run it (one subprocess per cell):

    python benchmarks/tpu_fit_table.py --jobs=2                    # pretraining: the released configs on pods
    python benchmarks/tpu_fit_table.py --table=finetune --jobs=1   # fine-tuning recipes (LoRA, full) on small slices

Each cell runs `python -m emu_jax.train_compile --config=configs/<config>.py --topology=<slice>
--fit --json=...` (libtpu, no TPU needed; step-time estimates on the table's ESTIMATED slices);
finished cells are kept under --out, so a re-run only compiles the missing ones. Prints the
markdown table and writes it between the README's `<!-- <table>-table:begin -->` /
`<!-- <table>-table:end -->` markers.
"""
import argparse
import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TABLES = {  # name: (configs (file[:variant]), slices, slices with step-time estimates, README marker)
    # step-time estimates recompile per scanned tower (minutes each): one slice only
    "tpu": (("emu2_37b", "emu1_14b"), ("v5p-64", "v5p-128", "v5p-256", "v5e-256", "v6e-256"), ("v5p-128",)),
    "finetune": (("emu2_chat:lora", "emu2_chat:full", "emu1_14b:instruct_lora", "emu1_14b:instruct_full"),
                 ("v5p-8", "v5p-16", "v5e-16", "v6e-8"), ()),
}


def run_cell(config: str, tpu_slice: str, out: pathlib.Path, estimated: tuple) -> dict:
    name = f"{config.replace(':', '_')}_{tpu_slice}"
    path = out / f"{name}.json"
    if not path.exists():
        log = out / f"{name}.log"
        file, _, variant = config.partition(":")
        with open(log, "w") as stream:
            estimate = "--estimate" if tpu_slice in estimated else "--noestimate"
            done = subprocess.run([sys.executable, "-m", "emu_jax.train_compile",
                                   f"--config=configs/{file}.py" + (f":{variant}" if variant else ""),
                                   f"--topology={tpu_slice}", "--fit", estimate, f"--json={path}.tmp"], cwd=ROOT,
                                  stdout=stream, stderr=subprocess.STDOUT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                                  check=False)
        if done.returncode:
            raise RuntimeError(f"{config} on {tpu_slice} failed; see {log}")
        os.replace(f"{path}.tmp", path)
    return dict(json.loads(path.read_text()), config=config, slice=tpu_slice)


def row(cell: dict) -> str:
    gib = 2 ** 30
    if not cell["memory"]:  # refused before or by the compiler
        return (f"| {cell['config']} | {cell['slice']} | {cell['devices']} | does not fit: "
                f"{cell['error'].split(':')[0]} | | | | | | |")
    mesh = "x".join(f"{cell['mesh'][a]}" for a in ("data", "fsdp", "tensor"))
    remat = "/".join(sorted(set(cell["remat"].values())))
    micro = cell["global_batch"] // cell["grad_accum_steps"] // max(cell["mesh"]["data"] * cell["mesh"]["fsdp"], 1)
    if not cell["fits"]:
        return (f"| {cell['config']} | {cell['slice']} | {cell['devices']} | does not fit: {cell['total_bytes'] / gib:.1f}"
                f" GiB per chip at {mesh}, {remat} remat, {micro} x {cell['grad_accum_steps']} | | | | | | |")
    memory = f"{cell['total_bytes'] / gib:.1f} / {cell['hbm_bytes'] / gib:.0f} GiB"
    speed = (f"{cell['estimated_seconds']:.2f} s | {cell['tokens_per_second']:,.0f} | {cell['mfu']:.0%}"
             if cell["estimated_seconds"] else "not estimated | | ")
    return (f"| {cell['config']} | {cell['slice']} | {cell['devices']} | {mesh} | {remat} | "
            f"{micro} x {cell['grad_accum_steps']} | {memory} | {speed} |")


def table(cells: list[dict]) -> str:
    head = ("| config | slice | chips | mesh (data x fsdp x tensor) | remat | rows/device x accum. | memory/device "
            "(of HBM) | est. step | tokens/s | est. MFU |\n|---|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + [row(c) for c in cells])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", default="tpu", choices=sorted(TABLES))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "tpu_fit"))
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    parser.add_argument("--slices", default="", help="Comma-separated subset to compile now (default: the table's).")
    parser.add_argument("--cached_only", action="store_true", help="Tabulate the finished cells; compile nothing.")
    args = parser.parse_args()
    configs, slices, estimated = TABLES[args.table]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = [(c, s) for s in (args.slices.split(",") if args.slices else slices) for c in configs]
    if args.cached_only:
        cells = [(c, s) for c, s in cells if (out / f"{c.replace(':', '_')}_{s}.json").exists()]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda cell: run_cell(*cell, out, estimated), cells))
    results.sort(key=lambda r: (configs.index(r["config"]), slices.index(r["slice"])))
    markdown = table(results)
    print(markdown)
    readme = pathlib.Path(args.readme)
    text = readme.read_text()
    begin, end = f"<!-- {args.table}-table:begin -->", f"<!-- {args.table}-table:end -->"
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        readme.write_text(before + begin + "\n" + markdown + "\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
