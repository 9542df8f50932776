"""The one-shot accelerator benchmark runs where the device machine's image lets it: jax, flax,
optax and orbax only (no grain, tensorflow-datasets, sentencepiece or ml_collections)."""
import json
import subprocess
import sys

import pytest
from conftest import ROOT

ABSENT_ON_THE_DEVICE = ("grain", "tensorflow_datasets", "tensorflow", "sentencepiece", "ml_collections")


@pytest.mark.slow
def test_accelerator_benchmark_runs_without_the_data_stack(tmp_path):
    """--smoke on this CPU with the data stack made unimportable: every section measures (the
    cuDNN check says why it is skipped), and its JSON renders the README table."""
    out = tmp_path / "accelerator.json"
    block = "; ".join(f"sys.modules[{name!r}] = None" for name in ABSENT_ON_THE_DEVICE)
    script = (f"import runpy, sys; {block}; sys.argv = ['accelerator.py', '--smoke', '--remat=none', "
              f"'--unscanned=none', '--json={out}']; runpy.run_path('benchmarks/accelerator.py', run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["errors"] == {} and "skipped" in result["attention"]
    assert {(d["layout"], d["batch"]) for d in result["decode"]} == {
        (layout, batch) for layout in ("unscanned", "scanned") for batch in (1, 16)}
    assert [(t["remat"], t["layers"]) for t in result["train"]] == [("none", "scanned"), ("none", "unscanned")]
    assert all(0 < t["mfu"] and t["loss"] > 0 for t in result["train"])
    assert "| train step remat=none, unscanned layers" in run.stdout
