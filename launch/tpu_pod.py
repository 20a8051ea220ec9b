"""Cloud TPU VM / pod slice launcher. Prints the gcloud commands (default) or runs them (--run).

    python launch/tpu_pod.py --name hh52b --zone us-east5-a --accelerator v5p-128 \\
        --experiment experiments/paper_52b.py --bucket my-bucket --workdir /gcs/my-bucket/hh52b
    python launch/tpu_pod.py --name hh-scan --zone us-central2-b --accelerator v4-32 \\
        --sweep experiments/pm_scaling.py --member 3 --bucket my-bucket \\
        --workdir /gcs/my-bucket/pm_scaling

Steps: [create the slice] → pack this checkout (git archive HEAD) → copy it to every worker →
install (venv, `pip install -e . jax[tpu]`) → [mount the bucket with gcsfuse on every
worker] → run the same `hh-jax run` on every worker (`--worker=all`; HH_JAX_DISTRIBUTED=auto
makes hh_jax.distributed call jax.distributed.initialize()) → [delete the slice].
The workdir must be one directory every worker sees (checkpoints are written by all hosts
together): a gcsfuse mount of a bucket (--bucket) or an NFS/Filestore path.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5",
           "v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}
TARBALL = "/tmp/hh_jax_code.tar.gz"
REMOTE_DIR = "~/hh_jax"


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="TPU VM / pod slice name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project")
    p.add_argument("--accelerator", default="v5p-128", help="e.g. v4-32, v5p-128")
    p.add_argument("--version", help="TPU runtime (default from the accelerator family)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--experiment", help="experiments/x.py[:arg]: run it")
    what.add_argument("--sweep", help="experiments/x.py[:arg]: run one member (--member)")
    p.add_argument("--member", type=int, help="index of the sweep member (hh-jax sweep "
                   "--dry-run lists them in order)")
    p.add_argument("--workdir", required=True, help="shared by all workers (see --bucket)")
    p.add_argument("--bucket", help="GCS bucket to mount at /gcs/BUCKET on every worker")
    p.add_argument("--create", action="store_true", help="create the slice first")
    p.add_argument("--delete", action="store_true", help="delete the slice at the end")
    p.add_argument("--run", action="store_true", help="execute (default: print only)")
    ns, rest = p.parse_known_args(argv)
    bad = [r for r in rest if not r.startswith("--config.")]
    if bad:
        p.error(f"unrecognised arguments: {' '.join(bad)}")
    if ns.sweep and ns.member is None:
        p.error("--sweep needs --member I")
    return ns, rest


def _tpu(ns, verb: str, *args: str) -> list[str]:
    project = [f"--project={ns.project}"] if ns.project else []
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, f"--zone={ns.zone}", *project]


def _ssh_all(ns, command: str) -> list[str]:
    return _tpu(ns, "ssh", ns.name, "--worker=all", f"--command={command}")


def run_command(ns, overrides: list[str]) -> str:
    """The `hh-jax run` each worker executes (a sweep member: its name and overrides)."""
    if ns.experiment:
        cmd = shlex.join(["hh-jax", "run", ns.experiment, "--workdir", ns.workdir, *overrides])
    else:
        sys.path.insert(0, REPO)
        from hh_jax import sweep

        members = sweep.members(ns.sweep)
        if not 0 <= ns.member < len(members):
            raise SystemExit(f"--member {ns.member}: {ns.sweep} has {len(members)} members")
        name, member = members[ns.member]
        cmd = sweep.command(ns.sweep, os.path.join(ns.workdir, name), member, overrides)
    return f"cd {REMOTE_DIR} && HH_JAX_DISTRIBUTED=auto .venv/bin/{cmd}"


def _mount(bucket: str) -> str:
    keyring = "/usr/share/keyrings/cloud.google.gpg"
    return " && ".join([
        "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | "
        f"sudo gpg --yes --dearmor -o {keyring}",
        f'echo "deb [signed-by={keyring}] https://packages.cloud.google.com/apt '
        'gcsfuse-$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list',
        "sudo apt-get update -q && sudo apt-get install -y -q gcsfuse",
        f"sudo mkdir -p /gcs/{bucket} && sudo chown $USER /gcs/{bucket}",
        f"(mountpoint -q /gcs/{bucket} || gcsfuse --implicit-dirs {bucket} /gcs/{bucket})"])


def plan(ns, overrides: list[str]) -> list[list[str]]:
    """Every command, in order, as argv lists."""
    family = ns.accelerator.rsplit("-", 1)[0]
    version = ns.version or RUNTIME.get(family, "tpu-ubuntu2204-base")
    steps = []
    if ns.create:
        steps.append(_tpu(ns, "create", ns.name, f"--accelerator-type={ns.accelerator}",
                          f"--version={version}"))
    steps.append(["git", "-C", REPO, "archive", "--format=tar.gz", "-o", TARBALL, "HEAD"])
    steps.append(_tpu(ns, "scp", TARBALL, f"{ns.name}:~/hh_jax_code.tar.gz", "--worker=all"))
    steps.append(_ssh_all(ns, f"mkdir -p {REMOTE_DIR} && tar xzf ~/hh_jax_code.tar.gz -C "
                              f"{REMOTE_DIR} && cd {REMOTE_DIR} && python3 -m venv .venv && "
                              ".venv/bin/pip install -q -e . 'jax[tpu]'"))
    if ns.bucket:
        steps.append(_ssh_all(ns, _mount(ns.bucket)))
    steps.append(_ssh_all(ns, run_command(ns, overrides)))
    if ns.delete:
        steps.append(_tpu(ns, "delete", ns.name, "--quiet"))
    return steps


def main(argv: list[str] | None = None) -> int:
    ns, overrides = parse(sys.argv[1:] if argv is None else argv)
    steps = plan(ns, overrides)
    if not ns.run:
        print(f"# dry run: {len(steps)} commands for {ns.accelerator} slice {ns.name!r} "
              "(add --run to execute)")
    for argv_ in steps:
        print(shlex.join(argv_), flush=True)
        if ns.run:
            subprocess.run(argv_, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
