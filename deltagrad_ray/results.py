"""Result tables: the per-request error estimate's columns and summary; the tables themselves are
written and read by :mod:`deltagrad_ray.store.tables` (re-exported here)."""

from __future__ import annotations

import numpy as np
import torch

from .store.tables import read_table as read_table, write_table as write_table


def estimate_columns(report) -> dict:
    """The per-request error estimate of a fan-out (:mod:`~deltagrad_ray.core.certificate`) as table
    columns: ``error_estimate`` (≈ ‖θ_DG − θ_exact‖ / ‖θ_exact − θ_full‖; inf: not certified closer
    than the full model; NaN: failed) and ``error_reliable`` (the estimate rests on a convex loss)."""
    est, rel = report.stats.get("error_estimate"), report.stats.get("error_reliable")
    if est is None:
        return {}
    return {"error_estimate": est, "error_reliable": rel}


def estimate_summary(report) -> dict:
    """Of a fan-out's per-request error estimates: the median and largest of the requests that have
    one, and how many are reliable (None where no request has a finite estimate: JSON has no inf)."""
    estimate, reliable = report.stats.get("error_estimate"), report.stats.get("error_reliable")
    if estimate is None:
        return {}
    have = estimate[~torch.isnan(estimate)]
    finite = have[torch.isfinite(have)]
    out = {"error_estimate_median": None, "error_estimate_max": None, "error_estimate_finite": int(len(finite)),
           "error_reliable": int(reliable.sum()) if reliable is not None else 0}
    if len(have):
        med, top = float(have.median()), float(have.max())
        out["error_estimate_median"] = float(f"{med:.4g}") if np.isfinite(med) else None
        out["error_estimate_max"] = float(f"{top:.4g}") if np.isfinite(top) else None
    return out
