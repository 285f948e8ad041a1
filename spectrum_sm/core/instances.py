"""The one table of SageMaker instance types: GPUs, GPU and host memory, EFA, local NVMe.

Pure data (standard library only): the planner, the request builder, the prices, ``compare``
and the in-container launcher (``entrypoints/launch.py``, shipped in the code channel) all read
it, so an instance's facts are written once. Types not in the table still work where the family
says enough (CUDA, NVMe); their GPU count comes from ``processes_per_host``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Families with local NVMe instance storage, encrypted by the instance: CreateTrainingJob
#: refuses a VolumeKmsKeyId for them. Besides these, every family with a "d" attribute
#: (m5d, c6id, g4dn, p3dn, p4d, p4de, ...) has instance storage.
NVME_FAMILIES = frozenset(
    {"g5", "g6", "g6e", "gr6", "g7e", "p5", "p5e", "p5en", "p6-b200", "trn1", "trn1n", "trn2"}
)


@dataclass(frozen=True)
class Instance:
    """One instance type's hardware, as the AWS instance-type pages state it."""

    name: str
    gpus: int  #: NVIDIA GPUs (0: CPU only)
    gpu_gib: float  #: memory per GPU
    host_gib: float  #: host memory
    efa: bool = False  #: EFA for NCCL (the SDK's SM_EFA_NCCL_INSTANCES)
    efa_rdma: bool = False  #: EFA with device RDMA (the SDK's SM_EFA_RDMA_INSTANCES)

    @property
    def nvme(self) -> bool:
        return has_instance_storage(self.name)


def _table(text: str) -> dict[str, Instance]:
    """The rows of a text table (below), keyed by instance type; ``#`` starts a comment."""
    rows = (line.split("#")[0].split() for line in text.splitlines())
    return {
        f"ml.{name}": Instance(
            f"ml.{name}", int(gpus), int(gpu_gib), int(host_gib), bool(efa), efa == ["rdma"]
        )
        for name, gpus, gpu_gib, host_gib, *efa in filter(None, rows)
    }


#: EFA: "efa" (EFA for NCCL, the SDK's SM_EFA_NCCL_INSTANCES), "rdma" (EFA with device RDMA
#: too, SM_EFA_RDMA_INSTANCES) or nothing. Memory in whole GiB.
INSTANCES: dict[str, Instance] = _table(
    """
# type (less ml.)  GPUs  GiB/GPU  host GiB  EFA
m5.large           0     0      8
m5.xlarge          0     0     16
m5.2xlarge         0     0     32
m5.4xlarge         0     0     64
m5.12xlarge        0     0    192
c5.xlarge          0     0      8
c5.2xlarge         0     0     16
g4dn.xlarge        1    16     16
g4dn.2xlarge       1    16     32
g4dn.8xlarge       1    16    128  efa
g4dn.12xlarge      4    16    192  efa
g5.xlarge          1    24     16
g5.2xlarge         1    24     32
g5.4xlarge         1    24     64
g5.8xlarge         1    24    128
g5.12xlarge        4    24    192
g5.16xlarge        1    24    256
g5.24xlarge        4    24    384
g5.48xlarge        8    24    768  efa
g6e.xlarge         1    48     32
g6e.2xlarge        1    48     64
g6e.12xlarge       4    48    384
g6e.48xlarge       8    48   1536
p3dn.24xlarge      8    32    768  efa
p4d.24xlarge       8    40   1152  rdma
p4de.24xlarge      8    80   1152  rdma
p5.48xlarge        8    80   2048  rdma
p5e.48xlarge       8   141   2048  rdma
trn1.32xlarge      0     0    512  rdma  # Trainium, not CUDA
"""
)


def family(instance_type: str) -> str:
    """``ml.g5.2xlarge`` -> ``g5``."""
    return instance_type.removeprefix("ml.").split(".")[0]


def instance(instance_type: str) -> Instance | None:
    """The table's row for an instance type, or None for one it does not hold."""
    return INSTANCES.get(instance_type)


def has_cuda(instance_type: str) -> bool:
    """Whether an instance type has NVIDIA GPUs: the g and p families (not trn, inf, CPUs)."""
    known = instance(instance_type)
    return known.gpus > 0 if known else family(instance_type).startswith(("g", "p"))


def has_instance_storage(instance_type: str) -> bool:
    """True for instance types whose volume is local NVMe (no EBS, no VolumeKmsKeyId)."""
    name = family(instance_type)
    return name in NVME_FAMILIES or re.fullmatch(r"[a-z]+\d+[a-z]*d[a-z]*", name) is not None
