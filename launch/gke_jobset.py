"""Renders the GKE JobSet that runs one training job on a TPU slice (one pod per TPU VM host, 4 chips
each; GKE's TPU webhook gives every pod its worker id and the others' hostnames, from which
`--config.distributed.auto=True` joins them). The bucket is mounted with the Cloud Storage FUSE CSI
driver at /mnt/bucket: the workdir (checkpoints, metrics) and the ArrayRecord shards live there.

    python launch/gke_jobset.py --name=emu2-stage2 --slice=v5p-128 --image=REGISTRY/emu_jax:latest \\
        --bucket=my-bucket --run=emu2_stage2 --config=configs/emu2_37b.py:stage2 \\
        -- --config.data.data_dir=/mnt/bucket/data | kubectl apply -f -

The image is `launch/Dockerfile` built from this checkout. The equivalent with xpk, which creates
the JobSet itself: xpk workload create --cluster=CLUSTER --workload=emu2-stage2 --tpu-type=v5p-128
--docker-image=REGISTRY/emu_jax:latest --command="python -m emu_jax.train ... --config.distributed.auto=True".
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from emu_jax.parallel import topology  # noqa: E402

TEMPLATE = """\
apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: {name}
  annotations:
    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool
spec:
  failurePolicy:
    maxRestarts: {max_restarts}
  replicatedJobs:
  - name: slice
    replicas: 1
    template:
      spec:
        parallelism: {hosts}
        completions: {hosts}
        backoffLimit: 0
        template:
          metadata:
            annotations:
              gke-gcsfuse/volumes: "true"
          spec:
            restartPolicy: Never
            serviceAccountName: {service_account}
            nodeSelector:
              cloud.google.com/gke-tpu-accelerator: {accelerator}
              cloud.google.com/gke-tpu-topology: {topology}
            containers:
            - name: train
              image: {image}
              command: {command}
              resources:
                limits:
                  google.com/tpu: {chips_per_host}
              volumeMounts:
              - name: bucket
                mountPath: /mnt/bucket
            volumes:
            - name: bucket
              csi:
                driver: gcsfuse.csi.storage.gke.io
                volumeAttributes:
                  bucketName: {bucket}
                  mountOptions: implicit-dirs
"""


def train_command(config: str, run: str, overrides: list[str]) -> list[str]:
    return ["python", "-m", "emu_jax.train", f"--config={config}", f"--workdir=/mnt/bucket/runs/{run}",
            "--config.distributed.auto=True", *overrides]


def render(name, tpu_slice, image, bucket, run, config, overrides, service_account="default",
           max_restarts=3) -> str:
    s = topology.parse(tpu_slice)
    command = json.dumps(train_command(config, run, overrides))  # a JSON list is a YAML flow sequence
    return TEMPLATE.format(name=name, hosts=s.hosts, accelerator=s.chip.gke_accelerator, topology=s.grid_name,
                           chips_per_host=min(s.chips, 4), image=image, bucket=bucket, command=command,
                           service_account=service_account, max_restarts=max_restarts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("name", "slice", "image", "bucket", "run", "config"):
        parser.add_argument(f"--{flag}", required=True)
    parser.add_argument("--service_account", default="default", help="Kubernetes service account with bucket access.")
    parser.add_argument("--max_restarts", type=int, default=3, help="Whole-slice restarts (each resumes).")
    args, overrides = parser.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    print(render(args.name, args.slice, args.image, args.bucket, args.run, args.config, overrides,
                 args.service_account, args.max_restarts), end="")


if __name__ == "__main__":
    main()
