"""Container-side driver: turns the SageMaker job's files into a run of analyze.py or train.py.

The job's ContainerEntrypoint is ``python3 .../entrypoints/launch.py analyze|train``. SageMaker
writes /opt/ml/input/config/{hyperparameters,resourceconfig,inputdataconfig}.json and mounts each
channel under /opt/ml/input/data/<name>; this script exports the usual ``SM_*`` variables, passes
hyperparameters as ``--name value``, and starts the script (under torchrun when the job has
several GPUs or instances). The local runner uses the same script with ``SM_OPT_ML`` pointing at a
folder laid out like /opt/ml. Standard library only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = {"analyze": HERE / "analyze.py", "train": HERE / "train.py"}


def _read_json(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default


def container_environment(root: Path) -> dict[str, str]:
    """The SM_* variables SageMaker's training toolkit would export, from the job's files."""
    config = root / "input" / "config"
    resources = _read_json(config / "resourceconfig.json", {})
    channels = _read_json(config / "inputdataconfig.json", {})
    hosts = resources.get("hosts") or ["algo-1"]
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
    for name in channels:
        env[f"SM_CHANNEL_{name.upper().replace('-', '_').replace('.', '_')}"] = str(
            root / "input" / "data" / name
        )
    return env


def command(kind: str, root: Path) -> list[str]:
    hyperparameters = _read_json(root / "input" / "config" / "hyperparameters.json", {})
    args = []
    for key, value in hyperparameters.items():
        args += [f"--{key}", str(value)]
    script = str(SCRIPTS[kind])
    resources = _read_json(root / "input" / "config" / "resourceconfig.json", {})
    hosts = resources.get("hosts") or ["algo-1"]
    per_host = int(os.environ.get("SPECTRUM_SM_NPROC_PER_HOST", "1"))
    if kind == "train" and (per_host > 1 or len(hosts) > 1):
        current = resources.get("current_host", hosts[0])
        # One host (local mode included) needs no name resolution for the rendezvous.
        master = hosts[0] if len(hosts) > 1 else "127.0.0.1"
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={len(hosts)}",
            f"--node_rank={hosts.index(current)}",
            f"--nproc_per_node={per_host}",
            f"--master_addr={master}",
            "--master_port=29500",
            script,
            *args,
        ]
    return [sys.executable, script, *args]


def main(argv: list[str]) -> int:
    root = Path(os.environ.get("SM_OPT_ML", "/opt/ml"))
    if len(argv) != 1 or argv[0] not in SCRIPTS:
        reason = f"launch.py expects one of {', '.join(SCRIPTS)}, got {argv}"
        print(f"error: {reason}", file=sys.stderr)
        failure = root / "output" / "failure"
        if failure.parent.is_dir():
            failure.write_text(reason)
        return 2
    env = {**os.environ, **container_environment(root)}
    # The code channel ships spectrum_sm next to entrypoints/.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    cmd = command(argv[0], root)
    print("launch: " + " ".join(cmd), flush=True)
    code = run_forwarding_signals(cmd, env)
    failure = root / "output" / "failure"
    if code != 0 and failure.parent.is_dir() and not failure.is_file():
        # The script died before writing its own reason (killed, out of memory, ...).
        failure.write_text(f"{SCRIPTS[argv[0]].name} exited with code {code}; see the job's log")
    return code


def run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> int:
    """Run ``cmd``, passing SIGTERM and SIGINT on: SageMaker's stop and spot notice is a SIGTERM
    to the container's first process, and train.py answers it with a checkpoint (exit 143)."""
    child = subprocess.Popen(cmd, env=env)

    def forward(signum, _frame):
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
