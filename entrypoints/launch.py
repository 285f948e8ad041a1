"""Container-side driver: turns the SageMaker job's files into a run of analyze.py or train.py.

The job's ContainerEntrypoint is ``python3 .../entrypoints/launch.py analyze|train``. SageMaker
writes /opt/ml/input/config/{hyperparameters,resourceconfig,inputdataconfig}.json and mounts each
channel under /opt/ml/input/data/<name>; this script exports the usual ``SM_*`` variables, passes
hyperparameters as ``--name value``, and starts the script (under torchrun when the job has
several GPUs or instances). The local runner uses the same script with ``SM_OPT_ML`` pointing at a
folder laid out like /opt/ml. Standard library only (and spectrum_sm's pure-data instance table),
except boto3 (in every training image) when the job names secrets:
``SPECTRUM_SM_SECRET_<VAR>=<Secrets Manager ARN>`` is read here with the
job's role and given to the script as ``<VAR>``; the value is never in the request or a log.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = {"analyze": HERE / "analyze.py", "train": HERE / "train.py"}
# The code channel ships spectrum_sm next to entrypoints/; its instance table is pure data.
sys.path.insert(0, str(HERE.parent))
from spectrum_sm.core.container import kill_with_parent  # noqa: E402
from spectrum_sm.core.instances import instance as instance_row  # noqa: E402

SECRET_PREFIX = "SPECTRUM_SM_SECRET_"


def secret_environment(environ: dict[str, str]) -> dict[str, str]:
    """``<VAR>: <secret value>`` for every ``SPECTRUM_SM_SECRET_<VAR>`` ARN, read with the job's
    role. A JSON secret holding ``<VAR>`` gives that field; any other secret is used whole."""
    wanted = {k[len(SECRET_PREFIX) :]: v for k, v in environ.items() if k.startswith(SECRET_PREFIX)}
    if not wanted:
        return {}
    import boto3

    values = {}
    for name, arn in sorted(wanted.items()):
        try:
            client = boto3.client("secretsmanager", region_name=arn.split(":")[3])
            text = client.get_secret_value(SecretId=arn)["SecretString"]
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
            raise RuntimeError(
                f"cannot read secret {arn} for {name} ({code}): the job's role needs "
                "secretsmanager:GetSecretValue on it (and kms:Decrypt on its key)"
            ) from None
        with contextlib.suppress(ValueError, TypeError):
            data = json.loads(text)
            if isinstance(data, dict) and isinstance(data.get(name), str):
                text = data[name]
        values[name] = text
    return values


def _read_json(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default


def container_environment(root: Path) -> dict[str, str]:
    """The SM_* variables SageMaker's training toolkit would export, from the job's files."""
    config = root / "input" / "config"
    resources = _read_json(config / "resourceconfig.json", {})
    channels = _read_json(config / "inputdataconfig.json", {})
    hosts = sorted(resources.get("hosts") or ["algo-1"])
    env = {
        "SM_MODEL_DIR": str(root / "model"),
        "SM_OUTPUT_DIR": str(root / "output"),
        "SM_OUTPUT_DATA_DIR": str(root / "output" / "data"),
        "SM_OUTPUT_FAILURE": str(root / "output" / "failure"),
        "SM_CHECKPOINT_DIR": str(root / "checkpoints"),
        "SM_TENSORBOARD_DIR": str(root / "output" / "tensorboard"),
        "SM_HOSTS": json.dumps(hosts),
        "SM_CURRENT_HOST": resources.get("current_host", hosts[0]),
        "SM_CHANNELS": json.dumps(sorted(channels)),
    }
    env.update(network_environment(resources))
    for name in channels:
        env[f"SM_CHANNEL_{name.upper().replace('-', '_').replace('.', '_')}"] = str(
            root / "input" / "data" / name
        )
    return env


def network_environment(resources: dict) -> dict[str, str]:
    """NCCL over the job's interface, and EFA where the instance type has it (as the SageMaker
    SDK's own torchrun driver does: sagemaker.train.container_drivers' SM_EFA_NCCL_INSTANCES,
    SM_EFA_RDMA_INSTANCES); values already in the environment win."""
    env = {"NCCL_SOCKET_IFNAME": resources.get("network_interface_name", "eth0")}
    row = instance_row(resources.get("current_instance_type", ""))
    if row and row.efa:
        env["FI_PROVIDER"] = "efa"
    if row and row.efa_rdma:
        env["FI_EFA_USE_DEVICE_RDMA"] = "1"
        env["RDMAV_FORK_SAFE"] = "1"
    return {k: v for k, v in env.items() if k not in os.environ}


def command(kind: str, root: Path) -> list[str]:
    hyperparameters = _read_json(root / "input" / "config" / "hyperparameters.json", {})
    args = [part for key, value in hyperparameters.items() for part in (f"--{key}", str(value))]
    script = str(SCRIPTS[kind])
    resources = _read_json(root / "input" / "config" / "resourceconfig.json", {})
    # Every host must agree on the ranks: the same sorted list everywhere, as the SDK does.
    hosts = sorted(resources.get("hosts") or ["algo-1"])
    per_host = int(os.environ.get("SPECTRUM_SM_NPROC_PER_HOST", "1"))
    if kind == "train" and (per_host > 1 or len(hosts) > 1):
        current = resources.get("current_host", hosts[0])
        # One host needs no name resolution for the rendezvous; local mode's hosts all live
        # on this machine (SPECTRUM_SM_MASTER_ADDR).
        master = os.environ.get("SPECTRUM_SM_MASTER_ADDR") or (
            hosts[0] if len(hosts) > 1 else "127.0.0.1"
        )
        port = os.environ.get("SPECTRUM_SM_MASTER_PORT", "29500")
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={len(hosts)}",
            f"--node_rank={hosts.index(current)}",
            f"--nproc_per_node={per_host}",
            f"--master_addr={master}",
            f"--master_port={port}",
            script,
            *args,
        ]
    return [sys.executable, script, *args]


def main(argv: list[str]) -> int:
    root = Path(os.environ.get("SM_OPT_ML", "/opt/ml"))
    failure = root / "output" / "failure"

    def fail(reason: str, code: int) -> int:
        print(f"error: {reason}", file=sys.stderr)
        if failure.parent.is_dir():
            failure.write_text(reason)
        return code

    if len(argv) != 1 or argv[0] not in SCRIPTS:
        return fail(f"launch.py expects one of {', '.join(SCRIPTS)}, got {argv}", 2)
    env = {**os.environ, **container_environment(root)}
    # Hub downloads go to the job's volume (large), not the image's home on the small root
    # disk; every rank shares one cache, whose file locks let one process download each file.
    env.setdefault("HF_HOME", str(root / "input" / "data" / ".cache" / "huggingface"))
    try:
        env.update(secret_environment(env))
    except RuntimeError as exc:
        return fail(str(exc), 1)
    # The code channel ships spectrum_sm next to entrypoints/.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    cmd = command(argv[0], root)
    print("launch: " + " ".join(cmd), flush=True)
    code = run_forwarding_signals(cmd, env)
    if code != 0 and failure.parent.is_dir() and not failure.is_file():
        # The script died before writing its own reason (killed, out of memory, ...).
        failure.write_text(f"{SCRIPTS[argv[0]].name} exited with code {code}; see the job's log")
    return code


def run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> int:
    """Run ``cmd``, passing SIGTERM and SIGINT on: SageMaker's stop and spot notice is a SIGTERM
    to the container's first process, and train.py answers it with a checkpoint (exit 143).

    Under torchrun the signal goes to the workers themselves, not to torchrun: torchrun would
    pass it on but kill the workers 30 s later, mid-save; SageMaker allows 120 s."""
    # The child ends with this launcher (a local job killed with -9).
    child = subprocess.Popen(cmd, env=env, preexec_fn=kill_with_parent)
    stopped = []

    def forward(signum, _frame):
        stopped.append(signum)
        workers = []  # torchrun's direct children (Linux /proc)
        if "torch.distributed.run" in cmd:
            for task in Path(f"/proc/{child.pid}/task").glob("*/children"):
                with contextlib.suppress(OSError):
                    workers += [int(p) for p in task.read_text().split()]
        for pid in workers or [child.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped and code != 0:
        return 128 + stopped[0]  # torchrun reports its stopped workers as a failure
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
