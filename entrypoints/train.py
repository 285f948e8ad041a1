"""The training job's entrypoint: fine-tune the Spectrum-selected layers (or full / LoRA) on one
process, several (DDP or FSDP2) or several hosts; resumable from checkpoints.

    python entrypoints/train.py --model_name_or_path M --spectrum_config layers.yaml \
        --train_data data.jsonl --output_dir out --max_steps 100
    torchrun --nproc_per_node 8 entrypoints/train.py ... --distribution fsdp

Inside SageMaker every path defaults from the container contract (SM_CHANNEL_MODEL,
SM_CHANNEL_SPECTRUM, SM_CHANNEL_TRAIN, SM_CHANNEL_VALIDATION, SM_MODEL_DIR, /opt/ml/checkpoints);
a crash writes its reason to /opt/ml/output/failure. The recipe itself lives in
spectrum_sm/training/recipe.py; no SageMaker SDK is used here.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

# The job's code folder ships spectrum_sm next to entrypoints/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spectrum_sm.core.container import die_with_parent, exit_job, write_failure
from spectrum_sm.core.errors import SpectrumError
from spectrum_sm.core.secrets import redact


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from spectrum_sm.training.args import parse_args
        from spectrum_sm.training.recipe import run

        return run(parse_args(argv))
    except SpectrumError as exc:
        return fail(str(exc))
    except Exception as exc:  # the job's FailureReason, with the traceback in the log
        traceback.print_exc()
        return fail(f"{type(exc).__name__}: {exc}")


def fail(reason: str) -> int:
    reason = redact(reason)  # a message may quote a token passed to the wrong flag
    print(f"error: {reason}", file=sys.stderr)
    write_failure(reason)
    return 1


if __name__ == "__main__":
    exit_job(main())
