"""Leave-one-out models by DeltaGrad, fanned out on Ray: jackknife estimates and influence."""

from __future__ import annotations

import sys

from pipelines._config import RAY, REQUIRED, fanout, main

SCHEMA = {"cache": REQUIRED, "test": REQUIRED, "output": REQUIRED, "ray": dict(RAY), "report": None}


def run(cfg: dict) -> dict:
    from deltagrad_ray import many
    from deltagrad_ray.erasure import resolve_cache
    from deltagrad_ray.report import Report, histogram
    from deltagrad_ray.results import write_table
    from deltagrad_ray.store import location, open_cache

    cache = open_cache(resolve_cache(cfg["cache"]))
    out_loc = location(cfg["output"])
    fan = fanout(cfg["ray"], parts=out_loc.join("loo.parts").uri)
    loo = many.loo(cache, fanout=fan, strict=True)
    fan.progress.close()
    jk = many.jackknife(cache, cfg["test"], loo_result=loo)
    inf = many.influence(cache, cfg["test"], loo_result=loo)
    p, loss = jk["predictions"], jk["test_loss"]
    write_table(out_loc.join("jackknife.parquet"), {"id": jk["test_ids"], "estimate": p.estimate, "bias": p.bias,
                                                     "bias_corrected": p.bias_corrected, "se": p.se}, overwrite=True)
    write_table(out_loc.join("influence.parquet"), {"id": inf["ids"], "influence": inf["influence"]}, overwrite=True)
    stats = loo.replay.stats
    out = {"pipeline": "jackknife", "loo_models": len(loo.ids), "backend": stats.get("backend"),
           "mode": stats.get("mode"), "test_loss": float(loss.estimate), "test_loss_bias_corrected":
           float(loss.bias_corrected), "test_loss_se": float(loss.se), "output": out_loc.uri}
    if cfg["report"]:
        rep = Report(f"Jackknife and influence: {cache.uri}")
        rep.table(["", "value"], [["leave-one-out models (DeltaGrad)", len(loo.ids)],
                                  ["backend", f"{stats.get('backend')} ({stats.get('mode', '')})"],
                                  ["test loss", float(loss.estimate)],
                                  ["jackknife bias-corrected test loss", float(loss.bias_corrected)],
                                  ["jackknife standard error", float(loss.se)]])
        order = inf["influence"].argsort(descending=True)
        rep.text("Most helpful training points (removing them raises the test loss most):")
        rep.table(["id", "LOO change in test loss"], [[int(inf["ids"][i]), float(inf["influence"][i])]
                                                      for i in order[:10]])
        rep.figure("influence", histogram(inf["influence"], "L(θ without i) − L(θ)", "Leave-one-out influence",
                                          log=True), "Influence of every training point on the test loss.")
        se = p.se.reshape(len(jk["test_ids"]), -1).max(dim=1).values
        rep.figure("se", histogram(se, "jackknife standard error", "Uncertainty of the test predictions"),
                   "Per test point, the largest jackknife standard error of its predicted probabilities "
                   "(or of its prediction, for regression).")
        out["report"] = rep.write(cfg["report"], "jackknife").uri
    return out


if __name__ == "__main__":
    sys.exit(main(__doc__, SCHEMA, run))
