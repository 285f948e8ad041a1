"""The AWS side of spectrum-sm: S3 access now; SageMaker jobs build on it.

Everything here imports boto3 lazily, inside the functions that talk to AWS.
"""
