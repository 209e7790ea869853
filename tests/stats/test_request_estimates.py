"""Every fan-out request carries its own error estimate, and ``exact_above`` retrains exactly those
the estimate does not certify: both checked against exact retraining of every request."""

from __future__ import annotations

import pytest
import torch

from deltagrad_ray import api, many
from deltagrad_ray.core import InputError, synthetic_classification
from deltagrad_ray.core.replay import deltagrad_batched, retrain_batched
from deltagrad_ray.core.requests import leave_one_out
from deltagrad_ray.store import open_cache


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("estimates")
    api.fit(synthetic_classification(300, 6, 3, seed=2), str(d / "c"), steps=80, lr=0.5, l2=0.01)
    c = open_cache(d / "c")
    ds = c.data()
    ids = ds.ids[:60]
    exact = retrain_batched(c.model, c.trajectory(), ds, leave_one_out(ds, ids))
    return d, c, ds, ids, exact


def _true_ratio(params, exact, final):
    return (params - exact).norm(dim=1) / (exact - final).norm(dim=1)


def test_each_request_has_the_replays_own_estimate_and_it_covers_the_truth(world):
    d, c, ds, ids, exact = world
    res = many.loo(str(d / "c"), ids, fanout=many.Fanout(batch_size=16))
    est = res.error_estimate
    assert est.shape == (60,) and res.replay.stats["error_reliable"].all()   # logreg + GD: the convex basis
    # the core's batched replay prices the same requests alike (other batches: same to round-off)
    core = deltagrad_batched(c.model, c.trajectory(), ds, leave_one_out(ds, ids))
    assert torch.allclose(est, core.error_estimate, rtol=1e-9, atol=0)
    truth = _true_ratio(res.params, exact, c.final)
    assert float(truth.max()) < 0.2                           # DeltaGrad did something, not nothing
    finite = est.isfinite()
    assert float(finite.double().mean()) > 0.9
    assert bool((est >= truth).all())                         # conservative for every request (inf covers)


def test_estimates_survive_a_resume_from_the_parts(world, tmp_path):
    d, c, ds, ids, exact = world
    whole = many.loo(str(d / "c"), ids, fanout=many.Fanout(batch_size=16))
    parts = str(tmp_path / "parts")
    many.loo(str(d / "c"), ids[:32], fanout=many.Fanout(batch_size=16, parts=parts + "-x"))  # another run
    first = many.loo(str(d / "c"), ids, fanout=many.Fanout(batch_size=16, parts=parts))
    again = many.loo(str(d / "c"), ids, fanout=many.Fanout(batch_size=16, parts=parts))   # every part read back
    assert torch.equal(first.error_estimate, again.error_estimate)
    assert torch.equal(first.replay.stats["error_reliable"], again.replay.stats["error_reliable"])
    assert torch.allclose(again.error_estimate, whole.error_estimate, rtol=1e-12, atol=0)


def test_exact_above_retrains_exactly_the_uncertified_requests(world):
    d, c, ds, ids, exact = world
    plain = many.loo(str(d / "c"), ids, fanout=many.Fanout(batch_size=16))
    E = float(plain.error_estimate[plain.error_estimate.isfinite()].median())
    due = ~(plain.error_estimate <= E)
    assert 0 < int(due.sum()) < len(ids)                      # the test reruns some, not all
    res = many.loo(str(d / "c"), ids, fanout=many.Fanout(batch_size=16), exact_above=E)
    method = res.method
    assert [m == "exact" for m in method] == due.tolist()       # exactly those above E, and only those
    marked = torch.tensor([m == "exact" for m in method])
    # the marked ones are exact retraining (batched alike: to round-off), the rest untouched
    assert torch.allclose(res.params[marked], exact[marked], rtol=0, atol=1e-12)
    assert torch.equal(res.params[~marked], plain.params[~marked])
    assert bool((res.error_estimate[~marked] <= E).all()) and bool((res.error_estimate[marked] == 0).all())
    truth = _true_ratio(res.params, exact, c.final)
    assert float(truth.max()) <= max(E, 1e-9)                 # every request now within E of exact retraining
    # E = 0 on a replay retrains everything; E = inf nothing
    assert many.loo(str(d / "c"), ids[:5], exact_above=float("inf")).method == ["deltagrad"] * 5
    with pytest.raises(InputError, match="exact_above must be a number >= 0"):
        many.loo(str(d / "c"), ids[:5], exact_above=-1)


def test_the_cli_table_has_the_estimate_and_the_method(world, tmp_path, capsys):
    import json

    from deltagrad_ray.cli import main
    from deltagrad_ray.results import read_table
    d, c, ds, ids, exact = world
    (tmp_path / "ids.txt").write_text("\n".join(str(int(i)) for i in ids[:20]))
    capsys.readouterr()
    code = main(["--json", "loo", "--cache", str(d / "c"), "--ids", str(tmp_path / "ids.txt"),
                 "--out", str(tmp_path / "loo.parquet"), "--exact-above", "0.005"])
    out, err = capsys.readouterr()
    assert code == 0, err
    line = json.loads(out.strip().splitlines()[-1])
    t = read_table(tmp_path / "loo.parquet")[0]
    est = t.column("error_estimate").to_pylist()
    method = t.column("method").to_pylist()
    assert line["retrained_exactly"] == method.count("exact") and set(method) <= {"exact", "deltagrad"}
    assert all(e <= 0.005 for e in est) and line["error_estimate_max"] <= 0.005
    assert t.column("error_reliable").to_pylist() == [True] * 20
    params = torch.tensor(t.column("params").to_pylist(), dtype=exact.dtype)
    assert float(_true_ratio(params, exact[:20], c.final).max()) <= 0.005
