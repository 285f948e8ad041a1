"""The AWS side of spectrum-sm: job configs, CreateTrainingJob requests validated against the
service model, S3, images and IAM policies, sending and following SageMaker jobs, local mode, and
the pipeline that runs the analysis then the training.

Everything here imports boto3 and the SageMaker SDK lazily, inside the functions that use them.
"""
