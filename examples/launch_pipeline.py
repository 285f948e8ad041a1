# python examples/launch_pipeline.py examples/qwen3-8b.yaml --dry-run
#
# Launch the Spectrum pipeline from Python: load a job config, override a few values in code, and
# run the analysis then the training job (on SageMaker, or here with --local).
"""Launch the Spectrum pipeline (analysis, then training) from Python code."""

from __future__ import annotations

import argparse
import json

import spectrum_sm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", help="a pipeline YAML such as examples/qwen3-8b.yaml")
    parser.add_argument("--dry-run", action="store_true", help="print the requests only")
    parser.add_argument("--local", action="store_true", help="run the jobs on this machine")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()

    config = spectrum_sm.load_pipeline(args.config, args.set)
    config.training.hyperparameters.setdefault("logging_steps", 10)  # code can adjust too
    result = spectrum_sm.launch(config, local=args.local, dry_run=args.dry_run)
    if args.dry_run:
        for kind, request in result.items():
            channels = [c["ChannelName"] for c in request["InputDataConfig"]]
            print(
                f"{kind}: {request['TrainingJobName']} on "
                f"{request['ResourceConfig']['InstanceType']}, channels {channels}"
            )
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
