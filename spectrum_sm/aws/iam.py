"""Least-privilege IAM policies for one pipeline config: the jobs' role and the launching user.

Every resource is narrowed to what the config names: its buckets and prefixes, its image
repository, its KMS keys, its secrets, its job names. Printed by ``spectrum-sm iam-policy``.
"""

from __future__ import annotations

import re
from typing import Any

from ..core.errors import SpectrumError
from .config import JobConfig, PipelineConfig, partition, validate
from .images import default_image
from .jobs import LOG_GROUP
from .requests import LOCAL_ROLE
from .s3 import split_s3_uri


def _s3_objects(p: str, uris: list[str]) -> list[str]:
    keys = {(bucket, key.strip("/")) for bucket, key in map(split_s3_uri, uris)}
    return sorted(f"arn:{p}:s3:::{bucket}/{key + '/' if key else ''}*" for bucket, key in keys)


def _list_statement(p: str, uris: list[str], sid: str) -> list[dict[str, Any]]:
    by_bucket: dict[str, set[str]] = {}
    for bucket, key in map(split_s3_uri, uris):
        key = key.strip("/")
        by_bucket.setdefault(bucket, set()).update({f"{key}/*", key} if key else {"*"})
    statements = []
    for index, (bucket, prefixes) in enumerate(sorted(by_bucket.items())):
        condition = {"StringLike": {"s3:prefix": sorted(prefixes)}}
        arn = f"arn:{p}:s3:::{bucket}"
        statements.append(_allow(f"{sid}{index}", "s3:ListBucket", arn, Condition=condition))
    return statements


def _account(config: JobConfig) -> str:
    return config.role.split(":")[4] if config.role and config.role != LOCAL_ROLE else "*"


def _image_repository(config: JobConfig, job: str) -> str:
    """``arn:...:ecr:region:account:repository/name`` of the image the job pulls."""
    image = config.image_uri or default_image(config.region, config.instance_type, job=job)
    host, _, rest = image.partition("/")
    account, region = host.split(".")[0], host.split(".")[3]
    repository = rest.split("@")[0].rsplit(":", 1)[0]
    return f"arn:{partition(region)}:ecr:{region}:{account}:repository/{repository}"


def _inputs(config: PipelineConfig) -> list[str]:
    t = config.training
    uris = [config.analysis.model, t.model, t.train_data, t.validation_data, t.spectrum_config]
    uris += [t.chat_template, t.resume_from, t.checkpoint_s3]
    return sorted({u for u in uris if u.startswith("s3://")})


def _allow(sid: str, action: str | list[str], resource: Any, **condition: Any) -> dict[str, Any]:
    """One Allow statement (``Condition=`` where it has one)."""
    return {"Sid": sid, "Effect": "Allow", "Action": action, "Resource": resource, **condition}


def job_role_policy(config: PipelineConfig) -> dict[str, Any]:
    """What the jobs do with their role: read inputs, write outputs, logs, metrics, the image."""
    a, t = config.analysis, config.training
    p, region, account = partition(t.region), t.region, _account(t)
    outputs = sorted({a.output_s3, t.output_s3})
    images = sorted({_image_repository(a, "analysis"), _image_repository(t, "training")})
    write = ["s3:PutObject", "s3:AbortMultipartUpload", "s3:DeleteObject"]
    statements: list[dict[str, Any]] = [
        _allow("ReadInputsAndCode", "s3:GetObject", _s3_objects(p, outputs + _inputs(config))),
        *_list_statement(p, outputs + _inputs(config), "ListInputs"),
        _allow("WriteOutputs", write, _s3_objects(p, outputs)),
        _allow(
            "Logs",
            [
                "logs:CreateLogGroup",
                "logs:CreateLogStream",
                "logs:DescribeLogStreams",
                "logs:PutLogEvents",
            ],
            f"arn:{p}:logs:{region}:{account}:log-group:{LOG_GROUP}:*",
        ),
        _allow(
            "Metrics",
            "cloudwatch:PutMetricData",
            "*",
            Condition={"StringLike": {"cloudwatch:namespace": "/aws/sagemaker/*"}},
        ),
        _allow("PullImageToken", "ecr:GetAuthorizationToken", "*"),
        _allow(
            "PullImage",
            ["ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"],
            images,
        ),
    ]
    keys = sorted({k for c in (a, t) for k in (c.volume_kms_key, c.output_kms_key) if k})
    if keys:
        encrypt = ["kms:CreateGrant", "kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"]
        statements.append(_allow("Keys", encrypt, [_key_arn(k, p, region, account) for k in keys]))
    secrets = sorted({_secret_arn(arn) for c in (a, t) for arn in c.secret_environment.values()})
    if secrets:
        statements.append(_allow("Secrets", "secretsmanager:GetSecretValue", secrets))
    if a.subnets or t.subnets:
        statements.append(
            _allow(
                "Vpc",
                [
                    "ec2:CreateNetworkInterface",
                    "ec2:CreateNetworkInterfacePermission",
                    "ec2:DeleteNetworkInterface",
                    "ec2:DeleteNetworkInterfacePermission",
                    "ec2:DescribeDhcpOptions",
                    "ec2:DescribeNetworkInterfaces",
                    "ec2:DescribeSecurityGroups",
                    "ec2:DescribeSubnets",
                    "ec2:DescribeVpcs",
                ],
                "*",
            )
        )
    return {"Version": "2012-10-17", "Statement": statements}


#: A complete secret ARN ends with the six random characters Secrets Manager appends to the name.
_FULL_SECRET_ARN = re.compile(r"^arn:[^:]+:secretsmanager:[^:]+:\d{12}:secret:.+-[A-Za-z0-9]{6}$")


def _secret_arn(arn: str) -> str:
    """The policy resource for a secret: a partial ARN (the name only) matches nothing in a
    policy, so it gets AWS's documented ``-??????`` for the random suffix."""
    return arn if _FULL_SECRET_ARN.match(arn) else arn + "-??????"


def _key_arn(key: str, p: str, region: str, account: str) -> str:
    return key if key.startswith("arn:") else f"arn:{p}:kms:{region}:{account}:key/{key}"


def launching_user_policy(config: PipelineConfig) -> dict[str, Any]:
    """What ``spectrum-sm run`` and ``compare`` do as the user: stage inputs, send, follow and
    stop the jobs, read their outputs."""
    a, t = config.analysis, config.training
    p, region, account = partition(t.region), t.region, _account(t)
    outputs = sorted({a.output_s3, t.output_s3})
    prefix = f"arn:{p}:sagemaker:{region}:{account}:training-job/"
    jobs = sorted({f"{prefix}{c.base_job_name.lower()}-*" for c in (a, t)})
    passed = {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}
    statements: list[dict[str, Any]] = [
        _allow(
            "Jobs",
            [
                "sagemaker:AddTags",
                "sagemaker:CreateTrainingJob",
                "sagemaker:DescribeTrainingJob",
                "sagemaker:StopTrainingJob",
            ],
            jobs,
        ),
        _allow("PassTheJobRole", "iam:PassRole", sorted({a.role, t.role}), Condition=passed),
        _allow("StageAndReadOutputs", ["s3:GetObject", "s3:PutObject"], _s3_objects(p, outputs)),
        *_list_statement(p, outputs + _inputs(config), "ListStaged"),
    ]
    if _inputs(config):  # config.json for the planner; ETags for reuse
        statements.append(_allow("ReadInputs", "s3:GetObject", _s3_objects(p, _inputs(config))))
    logs = f"arn:{p}:logs:{region}:{account}:log-group:{LOG_GROUP}:*"
    statements.append(_allow("FollowLogs", ["logs:DescribeLogStreams", "logs:GetLogEvents"], logs))
    keys = sorted({c.output_kms_key for c in (a, t) if c.output_kms_key})
    if keys:
        arns = [_key_arn(k, p, region, account) for k in keys]
        statements.append(_allow("EncryptUploads", ["kms:Decrypt", "kms:GenerateDataKey"], arns))
    if a.validate_role or t.validate_role:
        statements.append(_allow("ValidateRole", "iam:GetRole", sorted({a.role, t.role})))
    return {"Version": "2012-10-17", "Statement": statements}


def policies(config: PipelineConfig) -> dict[str, Any]:
    """Both policies, for ``spectrum-sm iam-policy``, for a config that ``run`` would accept."""
    for c in (config.analysis, config.training):
        validate(c, need_role=True)
    for job, c in (("analysis", config.analysis), ("training", config.training)):
        for name in ("volume_kms_key", "output_kms_key"):
            key = getattr(c, name)
            if key.startswith("alias/") or ":alias/" in key:
                raise SpectrumError(
                    f"{job}.{name} {key!r} is a KMS alias: a policy naming an alias does not "
                    "authorise the key's use, so this policy would not let the job encrypt. Put "
                    "the key's id or ARN in the config (aws kms describe-key --key-id "
                    f"{key.split(':')[-1]} --query KeyMetadata.Arn)"
                )
    return {
        "job_role": job_role_policy(config),
        "launching_user": launching_user_policy(config),
        "note": "attach job_role to the role in 'role' (trusting sagemaker.amazonaws.com) and "
        "launching_user to whoever runs spectrum-sm; a Hub model also needs internet access "
        "from the job (no network_isolation, and a NAT in a VPC)",
    }
