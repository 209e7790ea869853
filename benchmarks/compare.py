"""Why DeltaGrad and not X? Every unlearning method of the survey on the same changes (issue 7).

    python -m benchmarks.compare            # full run, ~10 min on 2 cores; writes docs/compare/
    python -m benchmarks.compare --quick    # small shapes, about a minute; writes nothing unless --out

Problems (synthetic, nothing is downloaded; a held-out test set is drawn with the training rows):

* ``mnist-logreg``: 20,000 × 784, 10 classes (MNIST's shape), logistic regression, GD, T = 100,
  η = 0.1, λ = 0.005 (the DeltaGrad paper's MNIST setting). The Newton step is not run here:
  p = 7,850 needs a 7,850² Hessian (0.5 GB; forming it is an O(n·p²) = 10¹² flop pass).
* ``small-logreg``: 20,000 × 100, 10 classes (p = 1,010), GD to convergence (T = 300, η = 4,
  λ = 0.01, ‖∇F(θ_T)‖ ≈ 3e-11) — where the Newton step's p × p Hessian is affordable and its
  premise (θ_T is the optimum) holds; every method runs.
* ``linear``: 20,000 × 200 regression, least squares, GD to convergence (T = 200, η = 1,
  λ = 0.05, ‖∇F(θ_T)‖ ≈ 5e-10), where the ridge downdate and the Newton step are exact.
* ``kmeans``: 20,000 × 20 Gaussian blobs, k = 10: Q-k-means deletions against full reruns.

Changes: deleting 0.01%, 0.1% and 1% of the rows (random, seeded) and adding 0.1% and 1% new rows.
Each (problem, method, change) is one JSON line. All times of a line are measured in the same
process, one after the other, best of ``--repeats``: the method's ``apply``, exact retraining of
the single model (``retrain_s``), and the method's own exact reference (``own_exact_s``: exact
retraining for DeltaGrad and fine-tuning, SISA retrained from scratch, the ridge refit, Newton's
method run to convergence for the Newton step, a full k-means rerun). Distances:

* ``dist_retrain``: ‖θ − θ_retrain‖ to exact retraining of the single model, and ``ratio_retrain``
  = that / ‖θ_retrain − θ_T‖ (the change's own effect): 1 means "no better than doing nothing";
* ``dist_exact``: to the method's own exact reference, ``ratio_exact`` likewise (for SISA: its own
  ensemble retrained from scratch; for the Newton step: the minimiser of the changed objective).

OpenMP threads spin-wait by default; on this 2-core machine that makes small torch array
operations ~10× slower (measured 8 ms vs 0.8 ms for a 785 × 785 multiply). The benchmark sets
``OMP_WAIT_POLICY=PASSIVE`` before torch loads, unless the environment already sets it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402

import torch  # noqa: E402

from deltagrad_ray.baselines import (DeltaGrad, ExactRetrain, FineTune, NewtonStep, QKMeans, Ridge, Sisa,  # noqa: E402
                                     TrainConfig, fit_trained)
from deltagrad_ray.baselines.newton import minimize  # noqa: E402
from deltagrad_ray.core import (Dataset, DeltaGradConfig, ModelSpec, synthetic_classification,  # noqa: E402
                                synthetic_regression)

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sizes:
    """Shapes of one run."""

    n: int = 20_000
    n_test: int = 5_000
    d_mnist: int = 784
    steps_mnist: int = 100
    d_small: int = 100
    steps_small: int = 300
    d_linear: int = 200
    steps_linear: int = 200
    kmeans_d: int = 20
    kmeans_k: int = 10
    kmeans_sequential: int = 100
    delete_rates: tuple[float, ...] = (0.0001, 0.001, 0.01)
    add_rates: tuple[float, ...] = (0.001, 0.01)
    repeats: int = 2


FULL = Sizes()
QUICK = Sizes(n=4_000, n_test=1_000, d_mnist=784, steps_mnist=40, d_small=50, steps_small=150, d_linear=100,
              steps_linear=150, kmeans_sequential=20, delete_rates=(0.001, 0.01), add_rates=(0.01,), repeats=1)


def _best_of(fn, repeats: int):
    best, out = math.inf, None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def _split(data: Dataset, n: int, n_test: int) -> tuple[Dataset, Dataset, Dataset]:
    """(training rows, test rows, a pool of new rows for additions) from one draw."""
    train = data.rows(torch.arange(n))
    test = data.rows(torch.arange(n, n + n_test))
    pool = data.rows(torch.arange(n + n_test, len(data)))
    return train, test, pool


def _changes(sizes: Sizes, n: int, pool: Dataset, seed: int = 11) -> list[tuple[str, float, torch.Tensor | None,
                                                                                 Dataset | None]]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out = []
    for rate in sizes.delete_rates:
        out.append((f"delete {rate:.2%}", rate, perm[: max(1, round(rate * n))], None))
    for rate in sizes.add_rates:
        out.append((f"add {rate:.2%}", rate, None, pool.rows(torch.arange(max(1, round(rate * n))))))
    return out


def _metric(scores: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 5) for k, v in scores.items() if k in ("accuracy", "mse", "loss")}


# -- gradient-trained problems ----------------------------------------------------------------------
def run_model_problem(name: str, sizes: Sizes, data_all: Dataset, cfg: TrainConfig, *, newton: bool,
                      ridge: bool, emit) -> list[dict]:
    train, test, pool = _split(data_all, sizes.n, sizes.n_test)
    t0 = time.perf_counter()
    trained = fit_trained(cfg, train)
    train_s = time.perf_counter() - t0
    retrain = ExactRetrain(cfg)
    methods: list = [retrain, DeltaGrad(cfg, DeltaGradConfig(period=5, burn_in=10)),
                     DeltaGrad(cfg, DeltaGradConfig(period=10, burn_in=10)), FineTune(cfg, k=5)]
    states: dict[str, object] = {m.name: trained for m in methods}
    fit_s = {m.name: 0.0 for m in methods}
    before: dict[str, torch.Tensor] = {m.name: trained.params for m in methods}
    if newton:
        nt = NewtonStep(cfg)
        t0 = time.perf_counter()
        states[nt.name] = nt.start(trained)
        fit_s[nt.name] = time.perf_counter() - t0
        before[nt.name] = minimize(trained.model, train, cfg.l2, trained.params)[0]
        methods.append(nt)
    if ridge:
        for mode in ("update", "refactor"):
            rg = Ridge(l2=cfg.l2, factor=mode)
            t0 = time.perf_counter()
            states[f"ridge({mode})"] = rg.fit(train)
            fit_s[f"ridge({mode})"] = time.perf_counter() - t0
            before[f"ridge({mode})"] = states[f"ridge({mode})"].params
            methods.append(rg)
    for S in (5, 10):
        sisa = Sisa(cfg, shards=S, slices=4)
        t0 = time.perf_counter()
        states[sisa.name] = sisa.fit(train)
        fit_s[sisa.name] = time.perf_counter() - t0
        before[sisa.name] = states[sisa.name].params
        methods.append(sisa)
    single_metric = _metric(trained.model.evaluate(trained.params, test.X, test.y))

    rows = []
    for label, rate, delete, add in _changes(sizes, len(train), pool):
        ch = retrain.change(trained, delete_ids=delete, add=add)
        ref_out, retrain_s = _best_of(lambda ch=ch: retrain.apply(trained, ch), sizes.repeats)
        theta_ret = ref_out.params
        moved_ret = float((theta_ret - trained.params).norm())
        for m in methods:
            key = m.name if not isinstance(m, Ridge) else f"ridge({m.factor})"
            st = states[key]
            chm = m.change(st, delete_ids=delete, add=add)
            if m is retrain:
                out, t = ref_out, retrain_s
            else:
                out, t = _best_of(lambda m=m, st=st, chm=chm: m.apply(st, chm), sizes.repeats)
            if isinstance(m, (ExactRetrain, DeltaGrad, FineTune)):
                ref, own_s = theta_ret, retrain_s
            else:
                ref_o, own_s = _best_of(lambda m=m, st=st, chm=chm: m.exact(st, chm), 1)
                ref = ref_o.params
            moved = float((ref - before[key]).norm())
            dist = float((out.params - ref).norm())
            single = out.params.ndim == 1
            dist_ret = float((out.params - theta_ret).norm()) if single else None
            row = {
                "benchmark": "compare", "problem": name, "n": len(train), "d": train.n_features, "p": trained.model.p,
                "steps": cfg.steps, "method": m.name if not isinstance(m, Ridge) else key, "change": label,
                "rate": rate, "rows_changed": len(ch.delete) + (len(ch.add) if ch.add is not None else 0),
                "time_s": round(t, 4), "retrain_s": round(retrain_s, 4), "speedup": round(retrain_s / t, 2),
                "own_exact_s": round(own_s, 4), "speedup_own": round(own_s / t, 2),
                "dist_exact": dist, "moved_exact": moved, "ratio_exact": dist / moved if moved > 0 else None,
                "dist_retrain": dist_ret, "moved_retrain": moved_ret,
                "ratio_retrain": dist_ret / moved_ret if single and moved_ret > 0 else None,
                "test": _metric(m.evaluate(out.state, test.X, test.y)), "test_single_model": single_metric,
                "fit_extra_s": round(fit_s[key], 3), "train_s": round(train_s, 3),
                "info": {k: v for k, v in out.info.items() if k not in ("from_slice",)},
            }
            emit(row)
            rows.append(row)
    return rows


# -- k-means ----------------------------------------------------------------------------------------------
def blobs(n: int, d: int, k: int, seed: int = 0) -> Dataset:
    """k Gaussian blobs with unit noise and centres drawn with spread 4 per coordinate."""
    g = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(k, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, k, (n,), generator=g)
    X = centres[labels] + torch.randn(n, d, generator=g, dtype=torch.float64)
    return Dataset(X, labels, torch.arange(n, dtype=torch.int64))


def run_kmeans(sizes: Sizes, emit) -> list[dict]:
    data_all = blobs(sizes.n + 1000, sizes.kmeans_d, sizes.kmeans_k)
    data = data_all.rows(torch.arange(sizes.n))
    pool = data_all.rows(torch.arange(sizes.n, len(data_all)))
    rows = []
    for eps in (0.0, 0.25, 1.0):
        km = QKMeans(sizes.kmeans_k, iters=10, eps=eps, gamma=0.2, seed=0)
        t0 = time.perf_counter()
        st = km.fit(data)
        fit_s = time.perf_counter() - t0
        loss = km.evaluate(st, data.X)["loss"]
        for label, rate, delete, add in _changes(sizes, len(data), pool):
            ch = km.change(st, delete_ids=delete, add=add)
            out, t = _best_of(lambda km=km, st=st, ch=ch: km.apply(st, ch), sizes.repeats)
            ref, rerun_s = _best_of(lambda km=km, st=st, ch=ch: km.exact(st, ch), sizes.repeats)
            row = {"benchmark": "compare", "problem": "kmeans", "n": len(data), "d": data.n_features,
                   "k": km.k, "iters": km.iters, "method": km.name, "change": label, "rate": rate,
                   "time_s": round(t, 4), "rerun_s": round(rerun_s, 4), "speedup": round(rerun_s / t, 2),
                   "rerun_from": out.info["rerun_from"], "identical": bool(torch.equal(out.params, ref.params)),
                   "loss": round(loss, 4), "fit_s": round(fit_s, 3)}
            emit(row)
            rows.append(row)
        # online: single deletions one after another, as requests arrive
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(5))[: sizes.kmeans_sequential]
        cur, times, reruns = st, [], 0
        for i in perm.tolist():
            ch = km.change(cur, delete_ids=torch.tensor([i]))
            t0 = time.perf_counter()
            out = km.apply(cur, ch)
            times.append(time.perf_counter() - t0)
            reruns += out.info["rerun_from"] is not None
            cur = out.state
        ref, rerun_s = _best_of(lambda km=km, cur=cur: km.fit(cur.rows.active()), 1)
        mean_t = sum(times) / len(times)
        row = {"benchmark": "compare", "problem": "kmeans", "n": len(data), "d": data.n_features, "k": km.k,
               "iters": km.iters, "method": km.name, "change": f"{len(times)} single deletions, one by one",
               "rate": None, "time_s": round(mean_t, 5), "rerun_s": round(rerun_s, 4),
               "speedup": round(rerun_s / mean_t, 2), "reruns": reruns, "requests": len(times),
               "identical": bool(torch.equal(cur.params, ref.params)), "loss": round(loss, 4),
               "fit_s": round(fit_s, 3)}
        emit(row)
        rows.append(row)
    return rows


# -- reports -------------------------------------------------------------------------------------------------
def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) < 1e-3 or abs(x) >= 1e4:
            return f"{x:.1e}"
        return f"{x:.{digits}g}"
    return str(x)


def markdown(rows: list[dict], sizes: Sizes, seconds: float, load: tuple[float, float] | None = None) -> str:
    busy = (f" Load average at start / end: {load[0]:.1f} / {load[1]:.1f} on 2 cores (above ~2, other jobs "
            "shared the machine and absolute times are inflated; the ratios of one line are measured side by "
            "side).") if load else ""
    lines = ["# Unlearning methods compared (`python -m benchmarks.compare`)", "",
             f"Generated by `benchmarks/compare.py` in {seconds:.0f} s on this machine "
             f"({torch.get_num_threads()} torch threads, float64, CPU). Times are the best of {sizes.repeats}; "
             f"every line's times were measured side by side in one process.{busy}", "",
             "Columns: **time** of the method's `apply`; **speed-up** over exact retraining of the single model "
             "(and over the method's own exact reference); **dist → retrain**: ‖θ − θ_retrain‖ / ‖θ_retrain − θ_T‖, "
             "the error relative to the change's own effect (1 = no better than ignoring the change); "
             "**dist → own exact**: the same against the method's own exact reference (SISA: its ensemble "
             "retrained from scratch; Newton: the changed objective's minimiser; ridge: the refit); "
             "**test**: accuracy (MSE for regression) on held-out rows.", ""]
    problems = [p for p in dict.fromkeys(r["problem"] for r in rows) if p != "kmeans"]
    for prob in problems:
        pr = [r for r in rows if r["problem"] == prob]
        r0 = pr[0]
        lines += [f"## {prob}: n = {r0['n']:,}, d = {r0['d']}, p = {r0['p']:,}, GD T = {r0['steps']} "
                  f"(training {r0['train_s']:.1f} s; single model test {r0['test_single_model']})", "",
                  "| change | method | time (s) | speed-up vs retrain | speed-up vs own exact | dist → retrain "
                  "| dist → own exact | test |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in pr:
            test = ", ".join(f"{k} {v:.4g}" for k, v in r["test"].items() if k != "loss")
            lines.append(f"| {r['change']} ({r['rows_changed']} rows) | {r['method']} | {_fmt(r['time_s'])} | "
                         f"{r['speedup']:.2f}× | {r['speedup_own']:.2f}× | {_fmt(r['ratio_retrain'])} | "
                         f"{_fmt(r['ratio_exact'])} | {test} |")
        lines.append("")
    km = [r for r in rows if r["problem"] == "kmeans"]
    if km:
        r0 = km[0]
        lines += [f"## k-means: Q-k-means (Ginart et al. 2019), n = {r0['n']:,}, d = {r0['d']}, k = {r0['k']}, "
                  f"T = {r0['iters']}", "",
                  "Deletion time against a full rerun with the same seed; *rerun from* is the first Lloyd "
                  "iteration the change altered (– : certified, nothing rerun; 0: a k-means++ seed was "
                  "deleted or beaten). eps = 0 is plain Lloyd's algorithm. *identical*: the centroids equal "
                  "the full rerun's bit for bit.", "",
                  "| method | change | time (s) | full rerun (s) | speed-up | rerun from / reruns | identical | loss |",
                  "| --- | --- | ---: | ---: | ---: | ---: | :---: | ---: |"]
        for r in km:
            rr = (f"{r['reruns']} of {r['requests']}" if "reruns" in r else _fmt(r["rerun_from"]))
            lines.append(f"| {r['method']} | {r['change']} | {_fmt(r['time_s'])} | {_fmt(r['rerun_s'])} | "
                         f"{r['speedup']:.1f}× | {rr} | {'yes' if r['identical'] else 'NO'} | {r['loss']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def plots(rows: list[dict], out: pathlib.Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = [p for p in dict.fromkeys(r["problem"] for r in rows) if p != "kmeans"]
    names = list(dict.fromkeys(r["method"] for r in rows if r["problem"] in problems))
    colour = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(names)}   # one colour per method
    written = []
    dels = [r for r in rows if r["problem"] in problems and r["change"].startswith("delete")]
    for key, ylabel, fname, log in (("speedup", "speed-up over exact retraining", "speedup.png", True),
                                    ("ratio", "‖θ − θ_ref‖ / ‖θ_ref − θ_T‖", "distance.png", True)):
        fig, axes = plt.subplots(1, len(problems), figsize=(5.2 * len(problems), 4.2), squeeze=False)
        for ax, prob in zip(axes[0], problems):
            pr = [r for r in dels if r["problem"] == prob]
            for method in dict.fromkeys(r["method"] for r in pr):
                mr = sorted((r for r in pr if r["method"] == method), key=lambda r: r["rate"])
                if key == "ratio":
                    ys = [r["ratio_retrain"] if r["ratio_retrain"] is not None else r["ratio_exact"] for r in mr]
                    if method == "retrain":
                        continue
                    ys = [max(y, 1e-16) for y in ys]
                else:
                    ys = [r["speedup"] for r in mr]
                ax.plot([100 * r["rate"] for r in mr], ys, marker="o", label=method, color=colour[method])
            ax.set_xscale("log")
            if log:
                ax.set_yscale("log")
            ax.set_xlabel("rows deleted (%)")
            ax.set_ylabel(ylabel)
            ax.set_title(prob)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        if key == "ratio":
            fig.suptitle("distance to exact retraining (SISA: to its own retrained ensemble; 0 plotted as 1e-16)",
                         fontsize=9)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    # accuracy after deleting 1%: every method, and SISA's cost against the single model
    fig, axes = plt.subplots(1, len(problems), figsize=(5.2 * len(problems), 4.2), squeeze=False)
    for ax, prob in zip(axes[0], problems):
        pr = [r for r in rows if r["problem"] == prob and r["change"].startswith("delete")]
        top = max(r["rate"] for r in pr)
        pr = [r for r in pr if r["rate"] == top]
        metric = "accuracy" if "accuracy" in pr[0]["test"] else "mse"
        ax.bar([r["method"] for r in pr], [r["test"][metric] for r in pr], color=[colour[r["method"]] for r in pr])
        ax.axhline(pr[0]["test_single_model"][metric], color="k", ls="--", lw=1, label="single model, before")
        lo = min(r["test"][metric] for r in pr)
        hi = max(r["test"][metric] for r in pr)
        pad = max(hi - lo, 1e-3)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_ylabel(f"test {metric}")
        ax.set_title(f"{prob}, after deleting {100 * top:g}%")
        ax.tick_params(axis="x", rotation=60, labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)
    written.append("accuracy.png")
    return written


def run_all(sizes: Sizes, out: pathlib.Path | None, emit=None) -> list[dict]:
    """Every problem; writes results.md, results.jsonl and the plots into ``out`` when given."""
    emit = emit or (lambda row: print(json.dumps(row), flush=True))
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    n_all = sizes.n + sizes.n_test + 2 * max(1, round(max(sizes.add_rates, default=0) * sizes.n))
    rows = []
    mnist = synthetic_classification(n_all, sizes.d_mnist, 10, seed=0)
    cfg = TrainConfig(ModelSpec("logreg", sizes.d_mnist, 10), steps=sizes.steps_mnist, lr=0.1, l2=0.005, seed=0)
    rows += run_model_problem("mnist-logreg", sizes, mnist, cfg, newton=False, ridge=False, emit=emit)
    small = synthetic_classification(n_all, sizes.d_small, 10, seed=1)
    cfg = TrainConfig(ModelSpec("logreg", sizes.d_small, 10), steps=sizes.steps_small, lr=4.0, l2=0.01, seed=0)
    rows += run_model_problem("small-logreg", sizes, small, cfg, newton=True, ridge=False, emit=emit)
    lin = synthetic_regression(n_all, sizes.d_linear, seed=2)
    cfg = TrainConfig(ModelSpec("linear", sizes.d_linear), steps=sizes.steps_linear, lr=1.0, l2=0.05, seed=0)
    rows += run_model_problem("linear", sizes, lin, cfg, newton=True, ridge=True, emit=emit)
    rows += run_kmeans(sizes, emit)
    seconds = time.perf_counter() - t0
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / "results.md").write_text(markdown(rows, sizes, seconds, (load0, os.getloadavg()[0])))
        plots(rows, out)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, about a minute")
    ap.add_argument("--out", type=pathlib.Path, default=None,
                    help="where results.md, results.jsonl and the plots go (default: docs/compare for the full run)")
    ap.add_argument("--repeats", type=int, default=None, help="timings are the best of this many runs")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    if args.repeats:
        sizes = replace(sizes, repeats=args.repeats)
    out = args.out if args.out is not None else (None if args.quick else ROOT / "docs" / "compare")
    run_all(sizes, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
