"""The pure core of spectrum-sm: SNR maths, checkpoint streaming, scanning and layer selection.

Nothing in here imports boto3 or the SageMaker SDK; the jobs layer (`spectrum_sm.aws`) and the
CLI build on top of it.
"""
