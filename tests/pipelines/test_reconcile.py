"""Reconciliation: a chain of DeltaGrad versions is closed by an exact retraining when due (by count,
or when the certified drift exceeds the policy), and every version's record carries its certificate.
Published models are compared with exact retraining of the first version without every erased id."""

from __future__ import annotations

import json

import pytest

from deltagrad_ray import api
from deltagrad_ray.core import synthetic_classification
from deltagrad_ray.erasure import (Fleet, LeaseSettings, ReconcileSettings, Registry, Settings, Target,
                                   VerifySettings, erase_fleet)
from deltagrad_ray.store import write_dataset


@pytest.fixture
def chain(tmp_path):
    write_dataset(synthetic_classification(1500, 8, 3, seed=0), tmp_path / "data.parquet")
    base = api.fit(str(tmp_path / "data.parquet"), str(tmp_path / "models" / "current"), steps=60, lr=0.5, l2=0.01)
    (tmp_path / "requests").mkdir()

    def run(k: int, reconcile: ReconcileSettings, verify: VerifySettings = VerifySettings()) -> None:
        (tmp_path / "requests" / f"b{k}.jsonl").write_text(
            "\n".join(json.dumps({"request_id": f"b{k}-{i}", "data_id": 40 * k + i}) for i in range(5)) + "\n")
        fleet = Fleet(str(tmp_path / "requests"), (Target("m", str(tmp_path / "models"),
                                                          str(tmp_path / "models" / "current")),),
                      Settings(verify, LeaseSettings(ttl_s=30), reconcile=reconcile))
        assert erase_fleet(fleet).exit_code() == 0
    return tmp_path, base, run


def _close(base, reg, ids):
    exact = api.retrain_exact(base, delete=sorted(ids))
    moved = float((exact - base.final).norm())
    assert float((reg.open(reg.latest()).final - exact).norm()) <= 0.05 * moved


def test_every_versions_publishes_an_exact_retraining_and_the_drift_restarts(chain):
    tmp, base, run = chain
    policy = ReconcileSettings(max_drift=None, every_versions=3)
    ids = []
    for k in range(1, 6):
        run(k, policy)
        ids += [40 * k + i for i in range(5)]
    reg = Registry(tmp / "models")
    methods = {r.version: r.method for r in reg.lineage()}
    assert methods == {0: "train", 1: "deltagrad", 2: "deltagrad", 3: "exact-retrain", 4: "deltagrad",
                       5: "deltagrad"}
    v3 = reg.recorded(3)
    assert v3.certificate["reconciled"] == "every_versions" and v3.certificate["drift_estimate"] == 0.0
    v5 = reg.latest()
    assert v5.certificate["since_exact_version"] == 3 and v5.certificate["replays_since_exact"] == 2
    # the exact version is exact: it equals retraining of the first version without the ids so far
    import torch
    exact3 = api.retrain_exact(base, delete=[40 * k + i for k in range(1, 4) for i in range(5)])
    assert torch.allclose(reg.open(v3).final, exact3, rtol=0, atol=1e-10 * float(exact3.norm()))
    _close(base, reg, ids)


def test_each_version_carries_its_certificate_and_a_drift_above_the_policy_reconciles(chain):
    tmp, base, run = chain
    loose = ReconcileSettings(max_drift=1.0, every_versions=None)
    run(1, loose, VerifySettings(sample=1.0))
    run(2, loose, VerifySettings(sample=1.0))
    reg = Registry(tmp / "models")
    v1, v2 = reg.recorded(1), reg.latest()
    assert v1.method == v2.method == "deltagrad"
    for v in (v1, v2):
        c = v.certificate
        assert c["basis"] == "convex" and c["reliable"] and c["error_absolute"] > 0
        # the estimate is conservative: at least the error sampled verification measured
        assert c["error_estimate"] >= c["verification"]["ratio"]
    assert v2.certificate["drift_absolute"] == pytest.approx(v1.certificate["error_absolute"]
                                                             + v2.certificate["error_absolute"])
    assert v2.certificate["since_exact_version"] == 0 and v2.certificate["replays_since_exact"] == 2
    # a policy stricter than the certified drift: the run publishes the exact retraining instead
    run(3, ReconcileSettings(max_drift=1e-12, every_versions=None))
    v3 = reg.latest()
    assert v3.method == "exact-retrain" and v3.certificate["reconciled"].startswith("drift ")
    assert v3.certificate["replay_drift"] > 1e-12 and v3.certificate["drift_estimate"] == 0.0
    _close(base, reg, [40 * k + i for k in (1, 2, 3) for i in range(5)])
    from deltagrad_ray.erasure import status
    (st,) = status(Target("m", str(tmp / "models")))
    assert st["calibration"]["verified_versions"] == 2 and st["calibration"]["estimate_at_least_truth"] == 1.0
