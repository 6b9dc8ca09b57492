"""Linear interpolation paths and loss barriers.

For chosen pairs (default: the two best ingredients, and the base model vs the best
ingredient when a base is configured), every split's metrics are measured at
``points`` evenly spaced ``alpha`` on ``(1-alpha) a + alpha b``. The loss barrier is
``max_alpha [L(alpha) - ((1-alpha) L(0) + alpha L(1))]`` (NLL), the accuracy barrier
the same with accuracy below the straight line. The best point on the paths (by val)
is returned as this strategy's soup.

With ``ingredients.align``, the ingredients were permuted onto a reference before the
search; the alignment step measured the path from the reference to every other
ingredient as trained, too (:mod:`soupsearch.evaluation.barriers`). For a pair with the reference,
the barriers before alignment are reported next to this strategy's (``..._unaligned``)
and both val curves are drawn in the plot.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from soupsearch.errors import ConfigError
from soupsearch.evaluation import selection
from soupsearch.evaluation.barriers import barrier, read_report, unaligned_curve
from soupsearch.merging.mixing import Recipe
from soupsearch.strategies import register_strategy
from soupsearch.strategies._base import Needs, SoupResult, Strategy, rank_by_score

BASE = "base"  # the endpoint name of the pre-trained model in ``pairs``


__all__ = ["Interpolate", "barrier"]


@register_strategy
class Interpolate(Strategy):
    name = "interpolate"
    description = "metrics along linear paths between ingredients (and the base), with loss barriers"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        pairs: list[tuple[str, str]] | None = None  # ingredient names or "base"; default: auto
        points: int = Field(default=11, ge=3)

    @classmethod
    def needs(cls, options) -> Needs:
        """The base when a pair names it (the default pairs use it only when it is configured)."""
        return Needs(base=any(BASE in pair for pair in options.pairs or ()))

    def _endpoint(self, ctx, name: str) -> tuple[tuple[float, ...], float]:
        if name == BASE:
            if not ctx.has_base:
                raise ConfigError(f"strategy {self.label}: pair uses 'base' but ingredients.base is not set")
            return (0.0,) * ctx.n, 1.0
        if name not in ctx.names:
            raise ConfigError(f"strategy {self.label}: unknown ingredient {name!r} in pairs; "
                              f"valid: base, {', '.join(ctx.names)}")
        i = ctx.names.index(name)
        return tuple(1.0 if j == i else 0.0 for j in range(ctx.n)), 0.0

    def run(self, ctx):
        pairs = self.options.pairs
        if pairs is None:
            order = rank_by_score(ctx.individual_scores(), ctx.higher_is_better)
            pairs = []
            if len(order) > 1:
                pairs.append((ctx.names[order[0]], ctx.names[order[1]]))
            if ctx.has_base:
                pairs.append((BASE, ctx.names[order[0]]))
        if not pairs:
            raise ConfigError(f"strategy {self.label}: nothing to interpolate (one ingredient and no base)")
        alphas = np.linspace(0, 1, self.options.points)
        curves, extra, steps = {}, {}, [dict() for _ in alphas]
        best = None
        report = read_report(ctx.run_dir)  # the alignment step's paths before/after re-basin
        for a_name, b_name in pairs:
            ca, ba = self._endpoint(ctx, a_name)
            cb, bb = self._endpoint(ctx, b_name)
            recipes = [Recipe(tuple((1 - t) * x + t * y for x, y in zip(ca, cb)), base_coeff=(1 - t) * ba + t * bb,
                              label=f"{a_name}->{b_name}@{t:.2f}") for t in alphas]
            ms = ctx.evaluate_all(recipes)
            tag = f"{a_name}-{b_name}"
            curves[tag] = {"alpha": alphas.tolist(), "metrics": ms}
            for j, m in enumerate(ms):
                for split in ("val", "test", "ood_mean"):
                    if split in m:
                        steps[j][f"interp/{tag}/{split}_accuracy"] = m[split]["accuracy"]
                        steps[j][f"interp/{tag}/{split}_nll"] = m[split]["nll"]
                score = m["val"][ctx.selection_metric]
                if best is None or selection.better(score, best[0], ctx.selection_metric):
                    best = (score, recipes[j], tag, float(alphas[j]))
            for split in ("val", "test"):
                extra[f"interp/{tag}/{split}_loss_barrier"] = barrier([m[split]["nll"] for m in ms])
                extra[f"interp/{tag}/{split}_accuracy_barrier"] = barrier([m[split]["accuracy"] for m in ms], True)
            un = unaligned_curve(report, a_name, b_name, [m["val"]["nll"] for m in ms])
            if un is not None:
                curves[tag]["unaligned_val"] = un
                extra[f"interp/{tag}/val_loss_barrier_unaligned"] = un["loss_barrier"]
                extra[f"interp/{tag}/val_accuracy_barrier_unaligned"] = un["accuracy_barrier"]
                ctx.log(f"{self.label}: {tag} val loss barrier {un['loss_barrier']:.3f} before alignment, "
                        f"{extra[f'interp/{tag}/val_loss_barrier']:.3f} after; accuracy barrier "
                        f"{un['accuracy_barrier']:.3f} before, {extra[f'interp/{tag}/val_accuracy_barrier']:.3f} after")
        artifacts = {}
        try:
            artifacts["interpolation.png"] = self._plot(ctx, curves, extra)
        except Exception as e:  # plotting never fails a search
            ctx.log(f"{self.label}: could not draw the interpolation plot: {e}")
        import json

        out_dir = ctx.run_dir / "soups" / self.label
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "interpolation.json").write_text(json.dumps({"curves": curves, "barriers": extra}, default=float))
        artifacts["interpolation.json"] = out_dir / "interpolation.json"
        if report is not None and any("unaligned_val" in c for c in curves.values()):
            for suffix in (".json", ".png"):
                p = ctx.run_dir / "aligned" / f"barriers{suffix}"
                if p.is_file():
                    artifacts[f"alignment_barriers{suffix}"] = p
        score, recipe, tag, alpha = best
        recipe = Recipe(recipe.coeffs, base_coeff=recipe.base_coeff, label=self.label)
        return [SoupResult(self.label, recipe, params={"pairs": [list(p) for p in pairs], "points": len(alphas),
                                                        "best_pair": tag, "best_alpha": alpha},
                           step_metrics=steps, artifacts=artifacts,
                           info={"extra_metrics": extra, "curves": {k: v["alpha"] for k, v in curves.items()},
                                 "num_ingredients": len(recipe.support())})]

    def _plot(self, ctx, curves, extra):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for tag, c in curves.items():
            a = c["alpha"]
            for split, style in (("val", "-"), ("test", "--"), ("ood_mean", ":")):
                if split in c["metrics"][0]:
                    axes[0].plot(a, [m[split]["accuracy"] for m in c["metrics"]], style, label=f"{tag} {split}")
            aligned = " aligned" if "unaligned_val" in c else ""
            line = axes[1].plot(a, [m["val"]["nll"] for m in c["metrics"]], "-",
                                label=f"{tag}{aligned} (barrier {extra[f'interp/{tag}/val_loss_barrier']:.3f})")
            if "unaligned_val" in c:  # the same pair before re-basin
                un = c["unaligned_val"]
                axes[0].plot(un["alpha"], un["accuracy"], "-.", color="grey", label=f"{tag} val, unaligned")
                axes[1].plot(un["alpha"], un["nll"], "-.", color=line[0].get_color(),
                             label=f"{tag} unaligned (barrier {un['loss_barrier']:.3f})")
        axes[0].set(xlabel="alpha", ylabel="accuracy", title="accuracy along the path")
        axes[1].set(xlabel="alpha", ylabel="val NLL", title="loss along the path")
        for ax in axes:
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = ctx.run_dir / "soups" / self.label / "interpolation.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
