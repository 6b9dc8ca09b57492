"""Search quality across demo sweeps: which strategies and which selection metric generalize.

Builds ``--sweeps`` small demo sweeps (real fine-tunes of the digits CNN; different seeds
and different learning-rate ranges, so a different share of the fine-tunes leaves the
pre-trained basin), runs one search per sweep and selection metric with the strategies
below (local backend: deterministic, no Ray start-up), and reports per selection metric
and strategy, against the best individual by val accuracy (the same reference for every
selection metric):

* mean test and shift (``ood_mean``: mean over the corruption sets) accuracy differences;
* wins: on how many sweeps the difference is > 0 (test, shift);
* sig: on how many sweeps the 95% paired bootstrap interval on test lies above 0;
* for the soups that start from greedy (learned_*, line_search, gradient): on how many
  sweeps their val selection score is strictly above greedy's ("> greedy").

Usage: ``python bench/quality.py [--sweeps 5] [--n 8] [--trials 20] [--out runs/bench-quality]``
(about 12 minutes on this shared 2-core machine with the defaults; ``--n 12``, the README's
table, about 22). Sweeps, results stores and Optuna studies are kept under ``--out``: a
re-run only scores what changed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

# (sweep seed, upper end of the fine-tunes' learning-rate range): a higher end sends more
# fine-tunes out of the basin (the demo's default range is 1e-3 .. 0.1)
SWEEPS = [(11, 0.1), (12, 0.2), (13, 0.3), (14, 0.05), (15, 0.4), (16, 0.15), (17, 0.25), (18, 0.1)]
SELECTION_METRICS = ("accuracy", "accuracy_nll", "nll")
START_FROM_GREEDY = ("learned_tpe", "learned_cmaes", "learned_tpe_small", "learned_cmaes_small", "line_search",
                     "gradient")


def strategies(trials: int) -> list:
    return [
        "best_individual",
        "uniform",
        {"name": "greedy"},
        {"name": "line_search"},
        {"name": "learned", "label": "learned_tpe", "sampler": "tpe", "n_trials": trials},
        {"name": "learned", "label": "learned_cmaes", "sampler": "cmaes", "n_trials": trials},
        # a smaller region: most ingredients of a sweep are worse than greedy's, and every
        # trial param moves at once (a box of +-0.2 puts much of the mass on them)
        {"name": "learned", "label": "learned_tpe_small", "sampler": "tpe", "radius": 0.05, "n_trials": trials},
        {"name": "learned", "label": "learned_cmaes_small", "sampler": "cmaes", "radius": 0.05, "sigma": 0.02,
         "n_trials": trials},
        # the previous default: TPE over the whole simplex, seeded with uniform and greedy
        {"name": "learned", "label": "learned_simplex", "sampler": "tpe", "center": None,
         "seed_with": ["uniform", "greedy"], "n_trials": trials},
        {"name": "gradient", "epochs": 10},
    ]


def config(sweep: Path, out: Path, metric: str, trials: int) -> dict:
    split = {"type": "digits", "split_file": str(sweep / "splits.json")}
    return {
        "name": f"quality-{sweep.name}-{metric}",
        "run_dir": str(out / "runs" / f"{sweep.name}-{metric}"),
        "model": {"factory": "builtin:digits_cnn", "kwargs": {"num_classes": 10}},
        "ingredients": {"path": str(sweep / "manifest.json"), "base": str(sweep / "base.safetensors")},
        "data": {"val": {**split, "split": "val"}, "test": {**split, "split": "test"},
                 "corruptions": {"base": "test", "severities": [3, 5]}},
        "eval": {"backend": "local", "selection_metric": metric},
        "tracking": {"tracking_uri": f"sqlite:///{out / 'mlflow.db'}", "experiment": "bench-quality",
                     "log_soup_weights": False, "log_best_model": False},
        "search": {"strategies": strategies(trials)},
    }


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def run(args) -> dict:
    import logging

    import optuna

    from soupsearch.config import config_from_dict
    from soupsearch.search.driver import run_search
    from soupsearch.sweeps.demo import make_sweep, sweep_is_complete

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("soupsearch").setLevel(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for seed, lr_hi in SWEEPS[: args.sweeps]:
        sweep = out / "sweeps" / f"s{seed}-lr{lr_hi:g}"
        t = time.time()
        if not sweep_is_complete(sweep):
            make_sweep(sweep, n=args.n, seed=seed, max_epochs=args.max_epochs, ranges={"lr": (1e-3, lr_hi)},
                       progress=False)
        man = json.loads((sweep / "manifest.json").read_text())
        accs = sorted(e["val_accuracy"] for e in man["ingredients"])
        print(f"sweep {sweep.name}: {args.n} fine-tunes ({time.time() - t:.0f}s), val acc best {accs[-1]:.3f} "
              f"median {np.median(accs):.3f} worst {accs[0]:.3f}, {sum(a < 0.8 for a in accs)} below 0.8",
              flush=True)
        for metric in args.metrics:
            t = time.time()
            cfg = config_from_dict(config(sweep, out, metric, args.trials), "bench")
            oc = run_search(cfg)
            ref = max(oc.ingredients, key=lambda r: r.metrics["val"]["accuracy"])  # first of equals
            rows = {}
            for s in oc.soups:
                sig = s.info.get("significance") or {}
                rows[s.name] = {
                    "val": s.metrics["val"]["accuracy"], "test": s.metrics["test"]["accuracy"],
                    "ood_mean": s.metrics["ood_mean"]["accuracy"], "val_selection": s.metrics["val"][metric],
                    "n": s.num_ingredients,
                    "test_ci_low": sig.get("delta_vs_best/test/accuracy_ci_low"),
                    "test_ci_high": sig.get("delta_vs_best/test/accuracy_ci_high"),
                }
            records.append({"sweep": sweep.name, "metric": metric, "seconds": time.time() - t,
                            "ref": {"name": ref.name, "val": ref.metrics["val"]["accuracy"],
                                    "test": ref.metrics["test"]["accuracy"],
                                    "ood_mean": ref.metrics["ood_mean"]["accuracy"]},
                            "soups": rows})
            g = rows["greedy"]
            print(f"  {metric:>12}: {time.time() - t:.0f}s; test/shift vs best individual: "
                  + ", ".join(f"{k} {v['test'] - ref.metrics['test']['accuracy']:+.3f}/"
                              f"{v['ood_mean'] - ref.metrics['ood_mean']['accuracy']:+.3f}"
                              for k, v in rows.items() if k != "best_individual")
                  + f"; greedy n={g['n']}", flush=True)
    return {"commit": commit(), "args": vars(args), "records": records}


def _better(a: float, b: float, metric: str) -> bool:
    from soupsearch.evaluation.selection import better

    return better(a, b, metric)


def table(res: dict) -> str:
    recs = res["records"]
    lines = ["| selection | strategy | mean Δtest | mean Δshift | wins test | wins shift | sig. test | > greedy on val |",
             "|---|---|---|---|---|---|---|---|"]
    for metric in dict.fromkeys(r["metric"] for r in recs):
        rs = [r for r in recs if r["metric"] == metric]
        k = len(rs)
        for name in rs[0]["soups"]:
            dt = [r["soups"][name]["test"] - r["ref"]["test"] for r in rs]
            ds = [r["soups"][name]["ood_mean"] - r["ref"]["ood_mean"] for r in rs]
            sig = sum(1 for r in rs if (r["soups"][name]["test_ci_low"] or 0) > 0)
            above = "-"
            if name in START_FROM_GREEDY:
                above = f"{sum(_better(r['soups'][name]['val_selection'], r['soups']['greedy']['val_selection'], metric) for r in rs)}/{k}"
            lines.append(f"| {metric} | {name} | {np.mean(dt):+.4f} | {np.mean(ds):+.4f} | "
                         f"{sum(d > 0 for d in dt)}/{k} | {sum(d > 0 for d in ds)}/{k} | {sig}/{k} | {above} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweeps", type=int, default=5)
    p.add_argument("--n", type=int, default=8, help="fine-tunes per sweep")
    p.add_argument("--max-epochs", type=int, default=None, help="cap on each fine-tune's epochs (default: none)")
    p.add_argument("--trials", type=int, default=20, help="Optuna trials of each learned variant")
    p.add_argument("--metrics", nargs="+", default=list(SELECTION_METRICS))
    p.add_argument("--out", default=str(REPO / "runs" / "bench-quality"))
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args()
    if args.sweeps > len(SWEEPS):
        p.error(f"--sweeps: at most {len(SWEEPS)}")
    import torch

    # one intra-op thread: this process shares a few cores with others, and spinning OpenMP
    # threads on an oversubscribed machine slow it down many times over
    torch.set_num_threads(args.threads)
    t = time.time()
    at = commit()  # the code this run imported (HEAD may move while it runs)
    res = run(args)
    res["commit"] = at
    res["seconds"] = time.time() - t
    Path(args.out, "quality.json").write_text(json.dumps(res, indent=1))
    print()
    print(f"search quality over {args.sweeps} demo sweeps of {args.n} fine-tunes (commit {res['commit']}, "
          f"{res['seconds'] / 60:.1f} min); Δ = accuracy minus the best individual's (best by val accuracy)")
    print(table(res))


if __name__ == "__main__":
    main()
