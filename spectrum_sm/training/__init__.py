"""Reusable pieces of the training job (data, arguments, checkpoints, metrics).

The loop itself is written out plainly in ``entrypoints/train.py``. Nothing here imports boto3 or
the SageMaker SDK; transformers and accelerate load inside the functions that need them.
"""
