"""Ahead-of-time compiles of the trainer's own step for TPU slices we do not have (libtpu describes
them; nothing runs) and for this machine's fake 8-device CPU mesh."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, load_config

from emu_jax import config_lib
from emu_jax.models import layers
from emu_jax.parallel import mesh as mesh_lib
from emu_jax.parallel import topology
from emu_jax.train import aot
from emu_jax.train.tasks import make_task


def test_slice_names_resolve_to_chip_grids_and_bad_names_say_why():
    v5p = topology.parse("v5p-128")
    assert (v5p.grid, v5p.chips, v5p.libtpu_topology) == ((4, 4, 4), 64, "v5:4x4x4")
    assert topology.parse("v5e-256").grid == (16, 16) and topology.parse("v4-64").chips == 32
    assert topology.parse("v6e:4x8").chips == 32
    assert len(topology.devices(topology.parse("v5e-1"))) == 1  # a host's 2x2 bounds shrink to one chip
    with pytest.raises(ValueError, match="not a standard shape"):
        topology.parse("v5p-100")
    with pytest.raises(ValueError, match="unknown TPU slice"):
        topology.parse("v9z-8")
    with pytest.raises(ValueError, match="2 dimensions"):
        topology.parse("v5e:2x2x2")


def state_bytes(config) -> int:
    """Parameters + AdamW's two moments, float32, for the whole model."""
    with nn.logical_axis_rules(config.mesh.rules):
        task = make_task(config)
        abstract = jax.eval_shape(lambda kw: task.model.init(jax.random.key(0), **kw), task.example_inputs())
    return 3 * 4 * sum(x.size for x in jax.tree.leaves(mesh_lib.strip_boxes(abstract["params"])))


def test_tiny_step_compiles_for_a_v5p_slice_and_fsdp_divides_the_state():
    config = config_lib.with_overrides(load_config("tiny"), {"mesh.data": 1, "mesh.fsdp": -1})
    report = aot.compile_report(config, "v5p:2x2x2", extrapolate=False)
    assert (report.devices, report.mesh) == (8, {"data": 1, "fsdp": 8, "tensor": 1})
    assert report.fits is True and report.hbm_bytes == 95 * 2**30
    assert 0 < report.total_bytes < report.hbm_bytes
    # the sharded state (params + moments) is an argument; replicated it would be 8x larger
    full = state_bytes(config)
    assert full / 8 <= report.memory["arguments"] < full / 2
    assert report.memory["aliased"] > 0  # the donated state is updated in place
    assert report.compiler_flops > 0 and report.analytic_flops > 0
    assert "fits" in aot.format_report(report)


def test_extrapolated_flops_of_a_scanned_stack_equal_the_unrolled_compile():
    """cost_analysis counts a scanned body once; the 1- and 2-layer extrapolation must recover the
    whole stack (checked on the fake CPU mesh, whose cost model counts FLOPs the same way)."""
    config = config_lib.with_overrides(load_config("tiny"), {"model.llm.scan_layers": True, "model.llm.num_layers": 3,
                                                             "model.vit.depth": 1})
    devices = jax.devices()
    lowered, _, _ = aot.lower_train_step(config, devices)
    scanned = aot.compiled_cost(lowered.compile())
    extrapolated = aot.extrapolated_cost(config, devices, scanned)["flops"]
    lowered, _, _ = aot.lower_train_step(config_lib.with_overrides(config, {"model.llm.scan_layers": False}), devices)
    unrolled = aot.compiled_cost(lowered.compile())["flops"]
    assert extrapolated == pytest.approx(unrolled, rel=0.01)
    assert scanned["flops"] < 0.9 * unrolled  # what the extrapolation corrects


def test_extrapolated_flops_count_every_micro_batch():
    """Gradient accumulation scans over the micro-batches, which cost_analysis counts once: the
    same global batch in two micro-batches must cost what it costs in one (it cost half), give or
    take the optimizer update counted twice (7% of this tiny step)."""
    config = config_lib.with_overrides(load_config("tiny"), {"model.llm.scan_layers": True, "model.llm.num_layers": 2,
                                                             "model.vit.depth": 1})
    devices = jax.devices()

    def extrapolated(accum):
        accumulated = config_lib.with_overrides(config, {"train.grad_accum_steps": accum})
        lowered, _, _ = aot.lower_train_step(accumulated, devices)
        return aot.extrapolated_cost(accumulated, devices, aot.compiled_cost(lowered.compile()))["flops"]

    assert extrapolated(2) == pytest.approx(extrapolated(1), rel=0.1)


def test_a_config_that_cannot_fit_reports_so_with_suggestions(tmp_path):
    """Emu2-37B on four v5e chips: it cannot fit; the CLI says so, lists what would lower memory as
    --config overrides, and exits cleanly."""
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "emu_jax.train_compile", "--config=configs/emu2_37b.py",
                           "--topology=v5e:2x2", "--noestimate", f"--json={out}"], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "does NOT fit" in done.stdout and "--config.mesh.fsdp=-1" in done.stdout
    report = json.loads(out.read_text())
    assert report["fits"] is False and report["devices"] == 4 and report["hbm_bytes"] == 16 * 2**30
    # replicated, the parameters and AdamW's moments alone exceed HBM: refused before compiling, and
    # only sharding them is suggested (remat and smaller micro-batches shrink activations only)
    assert report["memory"] == {} and report["state_bytes"] > 12 * 35e9 > report["hbm_bytes"]  # 12 bytes a parameter
    assert "the parameters and optimizer state alone take" in done.stdout
    assert "--config.model.llm.remat=full" not in done.stdout


def test_splash_attention_compiles_for_tpu_with_its_gradients():
    """On a TPU mesh "auto" picks the Pallas splash kernel for packed causal self-attention; the
    forward and backward kernels lower through Mosaic (tpu_custom_call), sharded over batch and heads."""
    mesh = mesh_lib.make_mesh({"data": 4, "fsdp": 1, "tensor": 2}, topology.devices(topology.parse("v5p:2x2x2")))
    spec = lambda *axes: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*axes))  # noqa: E731
    qkv = jax.ShapeDtypeStruct((8, 512, 4, 128), jnp.bfloat16, sharding=spec(("data", "fsdp"), None, "tensor"))
    ids = jax.ShapeDtypeStruct((8, 512), jnp.int32, sharding=spec(("data", "fsdp")))
    chosen = []

    def loss(q, k, v, segment_ids):
        mask = layers.SegmentMask(segment_ids)
        chosen.append(layers.choose_attention("auto", q, k, mask, None))
        return layers.dot_product_attention(q, k, v, mask=mask).astype(jnp.float32).sum()

    with jax.set_mesh(mesh), nn.logical_axis_rules(config_lib.LOGICAL_AXIS_RULES):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(qkv, qkv, qkv, ids).compile()
    assert chosen == ["splash"]
    assert np.char.count(compiled.as_text(), "tpu_custom_call") >= 2


def test_a_mesh_the_parameters_do_not_divide_over_is_reported_and_fitted_around():
    """Tiny ViT width 64 over a 128-way FSDP axis (v5p-256): the sharding cannot split it; the
    report says so instead of raising, and the fit search halves FSDP (data 2 x fsdp 64), never
    going back to a mesh it tried."""
    config = config_lib.with_overrides(load_config("tiny"), {"mesh.data": 1, "mesh.fsdp": -1,
                                                             "data.global_batch_size": 128})
    report = aot.compile_report(config, "v5p-256", extrapolate=False)
    assert report.fits is False and report.unshardable and report.mesh == {"data": 1, "fsdp": 128, "tensor": 1}
    assert "parameters do not split" in aot.format_report(report)
    report, applied = aot.fit(config, "v5p-256", extrapolate=False)
    assert report.fits is True and applied == {"mesh.data": 2, "mesh.fsdp": -1}
    assert report.mesh == {"data": 2, "fsdp": 64, "tensor": 1}


def test_a_negative_cost_model_time_is_no_estimate_not_a_negative_step():
    """The TPU cost model returns a negative optimal_seconds for some programs (configs/small.py on
    v5e-4: -532 s): no step time, tokens/s or MFU is derived from it, and the report says so."""
    config = config_lib.with_overrides(load_config("tiny"), {"model.llm.scan_layers": False,
                                                             "model.vit.scan_layers": False})
    devices, _ = aot.target_devices("cpu")
    estimate = aot.extrapolated_cost(config, devices, {"flops": 3e12, "seconds": -531.8})
    assert estimate == {"flops": 3e12, "seconds": 0.0}
    report = aot.Report(target="v5e-4", devices=4, mesh={"data": 4}, global_batch=16, grad_accum_steps=1, remat={},
                        fits=True, hbm_bytes=16 * 2**30, compiler_flops=3e12, compiler_seconds=-531.8,
                        estimated_flops=3e12, estimated_seconds=estimate["seconds"], analytic_flops=3e12,
                        tokens_per_step=16 * 128, peak_flops=197e12,
                        memory=dict(arguments=1, outputs=1, aliased=1, temporaries=1, code=1))
    assert report.mfu == 0.0 and report.tokens_per_second == 0.0
    text = aot.format_report(report)
    assert "negative step time (-531.8 s)" in text and "estimated step time" not in text
    report.compiler_seconds = 2.0  # the step's own time usable, a 2-layer variant's negative: no estimate either
    text = aot.format_report(report)
    assert "negative step time for a 2-layer variant" in text and "estimated step time" not in text


def test_compile_entry_on_this_machines_fake_cpu_mesh_reports_memory():
    config = config_lib.with_overrides(load_config("tiny"), {"mesh.data": 2, "mesh.fsdp": 4})
    report = aot.compile_report(config, "cpu", extrapolate=False)
    assert report.devices == 8 and report.mesh == {"data": 2, "fsdp": 4, "tensor": 1}
    assert report.fits is None and report.hbm_bytes is None  # no HBM to compare with on a CPU
    assert report.memory["arguments"] > 0 and report.total_bytes > 0 and report.compiler_flops > 0
    assert "per-device memory" in aot.format_report(report)


@pytest.mark.parametrize("policy,saved", [("save_qkv", {"query_proj", "key_proj", "value_proj"}),
                                          # out_proj too, where something after the layer needs it
                                          # (a post-norm ViT's norm); the sum here does not
                                          ("save_attention", {"query_proj", "key_proj", "value_proj",
                                                              "attention_context"}),
                                          ("full", set())])
def test_named_remat_policies_keep_exactly_the_tensors_they_name(policy, saved, capsys):
    """A remat policy that names tensors saves them for the backward pass (and nothing else the
    layer computes): a tag missing from Attention would silently turn the policy into full remat."""
    def block(params, x):
        attention = nn.remat(layers.Attention, policy=layers.REMAT_POLICIES[policy])(num_heads=2, head_dim=4)
        return attention.apply(params, x)[0].sum()

    x = jnp.ones((1, 3, 8))
    params = layers.Attention(num_heads=2, head_dim=4).init(jax.random.key(0), x)
    jax.ad_checkpoint.print_saved_residuals(block, params, x)
    lines = capsys.readouterr().out.splitlines()
    names = {line.split("named '")[1].split("'")[0] for line in lines if "named '" in line}
    computed = [line for line in lines if "from the argument" not in line and "named '" not in line]
    assert names == saved and not computed


@pytest.fixture(scope="module")
def tiny_search(tmp_path_factory):
    """Tiny on a v5p:2x2x2 slice, the ViT frozen, the LLM searched over no remat and full remat,
    from an empty cache -> (config, space, result, cache directory)."""
    from emu_jax.train import plan_search
    config = config_lib.with_overrides(load_config("tiny"), {"model.llm.num_layers": 4,
                                                             "optimizer.freeze": "^vit/"})
    space = plan_search.Space(policies=("none", "full"), tensor=(1,), accum=(1,))
    cache_dir = str(tmp_path_factory.mktemp("plan_cache"))
    return config, space, plan_search.search(config, "v5p:2x2x2", space, cache_dir=cache_dir), cache_dir


def test_plan_search_estimates_each_plan_from_probes_and_verifies_the_fastest(tiny_search):
    """The frozen ViT's backward is dropped, so it keeps "none"; no remat is the faster estimate, is
    verified by its own compile and comes first, and its estimate (full remat is the probes'
    reference plan, no remat is solved from one more probe) equals the compiler's cost of the whole
    plan compiled unrolled at its real depth; a second search compiles nothing (the cache)."""
    from emu_jax.train import plan_search
    config, space, result, cache_dir = tiny_search
    plans = [c.plan for c in result.candidates]
    assert [dict(p.remat) for p in plans] == [{"vit": "none", "llm": "none"}, {"vit": "none", "llm": "full"}]
    assert result.probes == 4 and result.compiled == 5  # (1, 1), (2, 1), (1, 2) layers, then full remat at 2
    best, other = result.candidates
    assert best.verdict == "fits" and best.compiled["bytes"] > 0 and other.verdict == plan_search.NOT_COMPILED
    assert best.mfu > other.mfu > 0 and best.estimated_seconds < other.estimated_seconds
    unrolled = config_lib.with_overrides(config, dict(best.plan.overrides(), **{
        "model.vit.scan_layers": False, "model.llm.scan_layers": False}))
    report = aot.compile_report(unrolled, "v5p:2x2x2", extrapolate=False)
    assert best.estimated_seconds == pytest.approx(report.compiler_seconds, rel=0.02)
    assert best.estimated_bytes == pytest.approx(report.total_bytes, rel=0.25)
    again = plan_search.search(config, "v5p:2x2x2", space, cache_dir=cache_dir)
    assert again.compiled == 0 and [c.verdict for c in again.candidates] == [c.verdict for c in result.candidates]


def test_plan_search_trusts_compiles_not_the_probes_memory(tiny_search, tmp_path, monkeypatch):
    """The probes' memory estimate misjudged scanned steps both ways (on emu2_37b it dropped every
    plan that fits), so it drops none: with every estimate made absurdly large the fastest plan is
    still compiled and fits. With no whole compile allowed to the ranked plans, the heaviest plan
    (full remat, what --fit finds) is compiled anyway: the search never reports nothing where the
    first-fit plan fits. (On a copy of the first search's cache: its probes and verified plan.)"""
    import shutil
    from emu_jax.train import plan_search
    config, space, _, first_cache = tiny_search
    cache_dir = str(shutil.copytree(first_cache, tmp_path / "cache"))
    estimate = plan_search._estimate
    monkeypatch.setattr(plan_search, "_estimate", lambda *a: (estimate(*a)[0], 1e15))
    result = plan_search.search(config, "v5p:2x2x2", space, cache_dir=cache_dir)
    assert [c.verdict for c in result.candidates] == ["fits", plan_search.NOT_COMPILED]
    assert result.candidates[0].estimated_bytes == 1e15 and dict(result.candidates[0].plan.remat)["llm"] == "none"
    capped = plan_search.search(config, "v5p:2x2x2", space, max_compiles=0, cache_dir=cache_dir)
    fits, = [c for c in capped.candidates if c.verdict == "fits"]
    assert dict(fits.plan.remat)["llm"] == "full" and fits.compiled["bytes"] > 0
    assert [c.verdict for c in capped.candidates if c is not fits] == ["not compiled (max_compiles=0 reached)"]
    # negative cost-model times among the probes (as on v5e and v6e): no plan is given a speed from them
    probed = plan_search.compile_all
    monkeypatch.setattr(plan_search, "compile_all", lambda jobs, workers: [
        dict(r, seconds=-abs(r["seconds"])) if "seconds" in r else r for r in probed(jobs, workers)])
    untimed = plan_search.search(config, "v5p:2x2x2", space, cache_dir=cache_dir)
    assert all(c.estimated_seconds == 0 and c.mfu == 0 for c in untimed.candidates)
    assert "fits" in [c.verdict for c in untimed.candidates]
