"""The README's TPU tables: configs on a few slices, fitted and estimated by the ahead-of-time
compile entry, run as a user would run it (one subprocess per cell):

    python benchmarks/tpu_fit_table.py --jobs=2                    # pretraining: the released configs on pods
    python benchmarks/tpu_fit_table.py --table=finetune --jobs=1   # fine-tuning recipes (LoRA, full) on small slices
    python benchmarks/tpu_fit_table.py --table=search --jobs=1     # the fastest plan that fits vs the first fit

Each cell runs `python -m emu_jax.train_compile --config=configs/<config>.py --topology=<slice>
--fit --json=...` (libtpu, no TPU needed; step-time estimates on the table's ESTIMATED slices);
finished cells are kept under --out, so a re-run only compiles the missing ones. Prints the
markdown table and writes it between the README's `<!-- <table>-table:begin -->` /
`<!-- <table>-table:end -->` markers.

The search table runs `train_compile --search` with SEARCH_FLAGS per cell and sets the fastest plan
beside the first fit (the `tpu` table's cell for the same config and slice, compiled if missing):
the search also estimates the first-fit plan with its probes, so both estimates are shown for it.
"""
import argparse
import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys

import readme_section

ROOT = pathlib.Path(__file__).resolve().parents[1]
TABLES = {  # name: (configs (file[:variant]), slices, slices with step-time estimates, README marker)
    # step-time estimates recompile per scanned tower (minutes each): one slice only
    "tpu": (("emu2_37b", "emu1_14b"), ("v5p-64", "v5p-128", "v5p-256", "v5e-256", "v6e-256"), ("v5p-128",)),
    "finetune": (("emu2_chat:lora", "emu2_chat:full", "emu1_14b:instruct_lora", "emu1_14b:instruct_full"),
                 ("v5p-8", "v5p-16", "v5e-16", "v6e-8"), ()),
    "search": (("emu2_37b",), ("v5p-128",), ()),
}
# the space searched per cell: every remat policy per tower over FSDP alone, 1 or 2 micro-batches
# (2 groups of 11 probe compiles, 1.5-2 minutes each for emu2_37b on 2 cores; each tensor-parallel
# size adds as many)
SEARCH_FLAGS = ("--tensor=1", "--accum=1,2", "--data=1", "--scan=true", "--verify=1")


def _compile_cell(config: str, tpu_slice: str, path: pathlib.Path, flags: list) -> dict:
    """Runs train_compile for one cell (unless its JSON exists) and returns the JSON."""
    if not path.exists():
        log = path.with_suffix(".log")
        file, _, variant = config.partition(":")
        with open(log, "w") as stream:
            done = subprocess.run([sys.executable, "-m", "emu_jax.train_compile",
                                   f"--config=configs/{file}.py" + (f":{variant}" if variant else ""),
                                   f"--topology={tpu_slice}", *flags, f"--json={path}.tmp"], cwd=ROOT,
                                  stdout=stream, stderr=subprocess.STDOUT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                                  check=False)
        if done.returncode:
            raise RuntimeError(f"{config} on {tpu_slice} failed; see {log}")
        os.replace(f"{path}.tmp", path)
    return dict(json.loads(path.read_text()), config=config, slice=tpu_slice)


def run_cell(config: str, tpu_slice: str, out: pathlib.Path, estimated: tuple) -> dict:
    estimate = "--estimate" if tpu_slice in estimated else "--noestimate"
    return _compile_cell(config, tpu_slice, out / f"{config.replace(':', '_')}_{tpu_slice}.json", ["--fit", estimate])


def run_search_cell(config: str, tpu_slice: str, out: pathlib.Path, estimated: tuple) -> dict:
    del estimated
    name = f"{config.replace(':', '_')}_{tpu_slice}"
    first_fit = _compile_cell(config, tpu_slice, out / f"{name}.json", ["--fit", "--estimate"])
    found = _compile_cell(config, tpu_slice, out / f"search_{name}.json", ["--search", *SEARCH_FLAGS])
    best = found["candidates"][0]
    if best["verdict"] != "fits":
        return dict(found, first_fit=first_fit, best_estimated=None)
    # the found plan estimated as the first fit is (the whole scanned step, extrapolated per layer)
    flags = [f"--config.{key}={value}" for key, value in best["overrides"].items()]
    best_estimated = _compile_cell(config, tpu_slice, out / f"search_{name}_best.json", ["--estimate", *flags])
    return dict(found, first_fit=first_fit, best_estimated=best_estimated)


def _plan_text(plan: dict) -> str:
    remat = "/".join(f"{t} {p}" for t, p in plan["remat"])
    return f"{plan['data']}x{plan['fsdp']}x{plan['tensor']}, {remat}, {plan['accum']} micro-batch(es)"


def search_row(cell: dict) -> str:
    gib = 2 ** 30
    candidates = cell["candidates"]
    best = candidates[0] if candidates[0]["verdict"] == "fits" else None
    first = cell["first_fit"]
    first_overrides = {k: v for k, v in first["overrides"].items() if not k.startswith("mesh.")}
    # the first-fit plan among the searched ones (same remat, mesh and micro-batches): its probe estimate
    same = [c for c in candidates if all(c["overrides"].get(k) == v for k, v in first_overrides.items())
            and (c["plan"]["data"], c["plan"]["fsdp"], c["plan"]["tensor"]) == tuple(first["mesh"][a] for a in
                                                                                      ("data", "fsdp", "tensor"))
            and c["plan"]["accum"] == first["grad_accum_steps"]]
    probed = f"{same[0]['mfu']:.0%}" if same and same[0]["mfu"] else "n/a"
    compiles = sum(1 for c in candidates if c["compiled"])
    whole = cell["best_estimated"]
    fastest = (f"{_plan_text(best['plan'])} | {best['compiled']['bytes'] / gib:.1f} / {first['hbm_bytes'] / gib:.0f} GiB"
               f" | {_step_and_mfu(whole)} (probes: {best['mfu']:.0%})" if best else "nothing fits | | |")
    first_remat = "/".join(sorted(set(first["remat"].values())))
    return (f"| {cell['config']} | {cell['slice']} | {fastest} | {first_remat} remat, "
            f"{first['mesh']['data']}x{first['mesh']['fsdp']}x{first['mesh']['tensor']}, {first['grad_accum_steps']} "
            f"micro-batch(es) | {first['total_bytes'] / gib:.1f} GiB | {_step_and_mfu(first, bold=False)} "
            f"(probes: {probed}) | {len(candidates)} plans, {cell['probes']} probe + "
            f"{compiles} full compiles |")


def _step_and_mfu(report: dict, bold: bool = True) -> str:
    """A compile report's estimated step and MFU cells ("not estimated" where the cost model gave none)."""
    if report["estimated_seconds"] <= 0:
        return "not estimated | n/a"
    mfu = f"{report['mfu']:.0%}"
    return f"{report['estimated_seconds']:.2f} s | " + (f"**{mfu}**" if bold else mfu)


def search_table(cells: list[dict]) -> str:
    head = ("| config | slice | fastest plan that fits (mesh, remat, micro-batches) | memory/chip | est. step | "
            "est. MFU | first fit (`--fit`) | memory/chip | est. step | est. MFU | searched |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + [search_row(c) for c in cells])


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
             if cell["estimated_seconds"] > 0 else "not estimated | | ")
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
    runner, tabulate = (run_search_cell, search_table) if args.table == "search" else (run_cell, table)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda cell: runner(*cell, out, estimated), cells))
    results.sort(key=lambda r: (configs.index(r["config"]), slices.index(r["slice"])))
    markdown = tabulate(results)
    print(markdown)
    readme_section.rewrite(args.readme, f"{args.table}-table", markdown)


if __name__ == "__main__":
    main()
