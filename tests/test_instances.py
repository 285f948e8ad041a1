"""The one instance table (spectrum_sm.core.instances) is what every reader uses, and it holds
only real SageMaker training instance types."""

from __future__ import annotations

from pathlib import Path

from staging import load_entrypoint

from spectrum_sm.aws.config import TrainingConfig, training_instance_types
from spectrum_sm.core.instances import INSTANCES, has_cuda, has_instance_storage, instance
from spectrum_sm.plan import CANDIDATES
from spectrum_sm.prices import SHIPPED

ROOT = Path(__file__).resolve().parents[1]


def test_every_row_is_a_training_instance_type_the_service_accepts():
    accepted = set(training_instance_types())
    assert sorted(set(INSTANCES) - accepted) == []


def test_prices_and_planner_name_only_instances_of_the_table():
    priced = {name for table in SHIPPED.values() for name in table}
    assert sorted(priced - set(INSTANCES)) == []
    assert all(INSTANCES[name].gpus > 0 and INSTANCES[name].gpu_gib > 0 for name in CANDIDATES)


def test_rows_agree_with_the_family_rules():
    for row in INSTANCES.values():
        assert has_cuda(row.name) == (row.gpus > 0), row.name
        assert not row.efa_rdma or row.efa, row.name
    assert instance("ml.p4d.24xlarge").nvme and instance("ml.g5.2xlarge").nvme
    assert not instance("ml.m5.xlarge").nvme
    assert has_instance_storage("ml.c6id.4xlarge") and not has_instance_storage("ml.c5.xlarge")
    assert has_cuda("ml.g7e.2xlarge") and not has_cuda("ml.trn2.48xlarge")


def test_gpus_per_host_come_from_the_table():
    assert TrainingConfig(instance_type="ml.g5.12xlarge").gpus_per_host() == 4
    assert TrainingConfig(instance_type="ml.p5e.48xlarge").gpus_per_host() == 8
    assert TrainingConfig(instance_type="ml.m5.xlarge").gpus_per_host() == 1  # one process


def test_the_launcher_sets_efa_from_the_table(monkeypatch):
    for name in ("FI_PROVIDER", "FI_EFA_USE_DEVICE_RDMA", "RDMAV_FORK_SAFE"):
        monkeypatch.delenv(name, raising=False)
    env = load_entrypoint("launch").network_environment
    assert env({"current_instance_type": "ml.p4d.24xlarge"})["FI_EFA_USE_DEVICE_RDMA"] == "1"
    g5 = env({"current_instance_type": "ml.g5.48xlarge"})
    assert g5["FI_PROVIDER"] == "efa" and "FI_EFA_USE_DEVICE_RDMA" not in g5
    assert "FI_PROVIDER" not in env({"current_instance_type": "ml.g5.2xlarge"})
