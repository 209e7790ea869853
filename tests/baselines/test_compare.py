"""The comparison benchmark end to end, on tiny shapes: every line, every file, every reference."""

import json

from benchmarks.compare import Sizes, run_all

TINY = Sizes(n=600, n_test=200, d_mnist=20, steps_mnist=20, d_small=10, steps_small=60, d_linear=10,
             steps_linear=60, kmeans_d=4, kmeans_k=3, kmeans_sequential=5, delete_rates=(0.01,),
             add_rates=(0.01,), repeats=1)


def test_compare_writes_every_configuration(tmp_path):
    rows = run_all(TINY, tmp_path, emit=lambda row: None)
    for name in ("results.md", "results.jsonl", "speedup.png", "distance.png", "accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(rows)
    json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])
    by = {(r["problem"], r["method"], r["change"]): r for r in rows}
    assert len(by) == len(rows), "one line per (problem, method, change)"
    methods = {p: {m for (q, m, _) in by if q == p} for p in ("mnist-logreg", "small-logreg", "linear")}
    assert "newton" not in methods["mnist-logreg"] and "newton" in methods["small-logreg"]
    assert {"ridge(update)", "ridge(refactor)", "newton"} <= methods["linear"]
    assert {"retrain", "deltagrad(T0=5)", "deltagrad(T0=10)", "finetune(k=5)", "sisa(S=5,R=4)",
            "sisa(S=10,R=4)"} <= methods["mnist-logreg"]
    for r in rows:
        if r["problem"] == "kmeans":
            assert r["identical"], r
            continue
        assert r["time_s"] > 0 and r["retrain_s"] > 0
        if r["method"] == "retrain":
            assert r["dist_retrain"] == 0 and r["dist_exact"] == 0
        if r["method"].startswith("sisa"):
            assert r["dist_exact"] == 0 and r["dist_retrain"] is None      # exact w.r.t. its ensemble
        if r["method"].startswith("ridge") or (r["problem"] == "linear" and r["method"] == "newton"):
            assert r["dist_exact"] < 1e-9, r                                  # exact for least squares
    assert "## k-means" in (tmp_path / "results.md").read_text()
