"""The launch/ scripts, run against stand-ins for gcloud, scontrol/srun and python that record what
they were asked to do (the clusters themselves are not reachable from here)."""
import os
import stat
import subprocess
import sys

import yaml
from conftest import ROOT

RECORDER = """#!/usr/bin/env bash
{{ printf '%s' "$(basename "$0")"; for a in "$@"; do printf ' [%s]' "$a"; done
   printf ' CUDA_VISIBLE_DEVICES=%s\\n' "${{CUDA_VISIBLE_DEVICES:-}}"; }} >> {log}
"""


def stand_ins(tmp_path, names, extra=None):
    """A PATH whose `names` only append their argv to calls.log (plus `extra` scripts)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in names:
        (bin_dir / name).write_text(RECORDER.format(log=tmp_path / "calls.log"))
    for name, body in (extra or {}).items():
        (bin_dir / name).write_text(body)
    for script in bin_dir.iterdir():
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")


def test_every_launch_script_parses():
    for script in ("tpu_vm.sh", "slurm.sbatch", "local_processes.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "launch" / script)], check=True)


def test_slurm_script_starts_one_process_per_gpu_joined_at_the_first_node(tmp_path):
    srun = """#!/usr/bin/env bash
# two nodes x two GPUs: run the task command once per task with SLURM's per-task variables
while [[ $1 == --* ]]; do shift; done
for rank in 0 1 2 3; do SLURM_PROCID=$rank SLURM_LOCALID=$((rank % 2)) SLURM_NTASKS=4 "$@"; done
"""
    # a long node list, as a large allocation prints: a reader that stops after the first line would
    # make this writer die of SIGPIPE, which fails the script under pipefail
    scontrol = "#!/usr/bin/env bash\nprintf 'node7\\nnode8\\n'\nseq -f 'spare%g' 1 200000\n"
    env = stand_ins(tmp_path, ["python"], {"srun": srun, "scontrol": scontrol})
    env.update(CONFIG="configs/tiny.py", WORKDIR="/shared/run", SLURM_JOB_ID="123", SLURM_JOB_NODELIST="node[7-8]")
    subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "--config.train.steps=5"], env=env, check=True)
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert len(calls) == 4
    for rank, call in enumerate(calls):
        assert call.startswith("python [-m] [emu_jax.train] [--config=configs/tiny.py] [--workdir=/shared/run]")
        assert "[--config.distributed.coordinator=node7:20123]" in call
        assert "[--config.distributed.num_processes=4]" in call
        assert f"[--config.distributed.process_id={rank}]" in call
        assert call.endswith(f"[--config.train.steps=5] CUDA_VISIBLE_DEVICES={rank % 2}")


def test_tpu_vm_script_installs_mounts_and_starts_every_worker(tmp_path):
    env = stand_ins(tmp_path, ["gcloud"])
    subprocess.run(["bash", str(ROOT / "launch" / "tpu_vm.sh"), "emu-v5p", "us-east5-a", "my-bucket", "stage2",
                    "configs/emu2_37b.py:stage2", "--config.data.data_dir=/mnt/my-bucket/data"],
                   env=env, check=True, cwd=tmp_path)
    scp, setup, train = (tmp_path / "calls.log").read_text().splitlines()
    assert "[scp]" in scp and "[--worker=all]" in scp
    assert "[--worker=all]" in setup and "gcsfuse --implicit-dirs my-bucket /mnt/my-bucket" in setup
    assert "jax[tpu]" in setup
    assert "[--worker=all]" in train
    for part in ("--config=configs/emu2_37b.py:stage2", "--workdir=/mnt/my-bucket/runs/stage2",
                 "--config.distributed.auto=True", "--config.data.data_dir=/mnt/my-bucket/data"):
        assert part in train


def test_gke_jobset_has_one_pod_per_host_on_the_slice_topology():
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "gke_jobset.py"), "--name=emu2", "--slice=v5p-128",
                           "--image=registry/emu_jax:1", "--bucket=my-bucket", "--run=stage2",
                           "--config=configs/emu2_37b.py:stage2", "--", "--config.train.steps=10"],
                          capture_output=True, text=True, check=True)
    jobset = yaml.safe_load(done.stdout)
    job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    pod = job["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 16  # 64 chips, 4 per host
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "4x4x4"}
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    assert container["command"] == ["python", "-m", "emu_jax.train", "--config=configs/emu2_37b.py:stage2",
                                    "--workdir=/mnt/bucket/runs/stage2", "--config.distributed.auto=True",
                                    "--config.train.steps=10"]
    assert pod["volumes"][0]["csi"]["volumeAttributes"]["bucketName"] == "my-bucket"
