"""The training job: arguments, data, chat masks, the memory planner, checkpoints and metrics, and
the loop itself in :mod:`.recipe` (``entrypoints/train.py`` parses the arguments and calls
:func:`.recipe.run`).

Nothing here imports boto3 or the SageMaker SDK; transformers and accelerate load inside the
functions that need them.
"""
