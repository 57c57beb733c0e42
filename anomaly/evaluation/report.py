"""Plain-text summaries of a run for the console."""

from __future__ import annotations

import math

from anomaly.evaluation.aggregate import ALL_FOLDS


def _fmt(value: float | None) -> str:
    return "   -  " if value is None else f"{100 * value:6.1f}"


def threshold_line(threshold: float, score: str, target_fpr: float, holdout_images: int | None) -> str:
    """The decision threshold and what it aims at. Below an FPR of 1 / m, m held-out normal images
    cannot tell thresholds apart: the empirical threshold is then their largest score."""
    line = f"threshold: {threshold:.6g} on {score}"
    if holdout_images and target_fpr * holdout_images < 1:
        return (
            f"{line}, the largest of {holdout_images} held-out normal scores (aiming at "
            f"{target_fpr:.2%} false positives takes {math.ceil(1 / target_fpr)})"
        )
    return f"{line} (aims at {target_fpr:.2%} false positives on normal images)"


def format_run_table(results: dict) -> str:
    """Per-level and summed image AUROC (in %) for each score type of one run."""
    scores: dict = results.get("scores", {})
    types = list(scores)
    levels = sorted({lv for t in types for lv in scores[t]["per_level"]}, key=int)
    width = max(8, *(len(t) + 1 for t in types)) if types else 8
    header = "level".ljust(7) + "".join(t.rjust(width) for t in types)
    fold = ALL_FOLDS if results.get("fold") is None else results.get("fold")
    lines = [
        f"{results.get('method')} | {results.get('backbone')} | {results.get('category')} | "
        f"fold {fold} | {results.get('n_train')} train, {results.get('n_test')} test images",
        "image AUROC (%)",
        header,
        "-" * len(header),
    ]
    for level in levels:
        lines.append(
            level.ljust(7) + "".join(_fmt(scores[t]["per_level"].get(level)).rjust(width) for t in types)
        )
    lines.append("sum".ljust(7) + "".join(_fmt(scores[t]["sum"]).rjust(width) for t in types))
    if results.get("pixel_auroc") is not None:
        pro = results.get("pro")
        lines.append(
            f"anomaly maps: pixel AUROC {100 * results['pixel_auroc']:.1f} %"
            + ("" if pro is None else f", PRO {100 * pro:.1f} %")
            + f" over {results.get('n_pixel_images', results.get('n_test'))} test images"
        )
    point = results.get("working_point") or {}
    decision = point.get("decision") or {}
    if decision.get("threshold") is not None:
        holdout = point.get("holdout_images") if decision.get("method") == "empirical" else None
        lines.append(threshold_line(decision["threshold"], decision["score"], point["target_fpr"], holdout))
    if "run_dir" in results:
        lines.append(f"results: {results['run_dir']}/results.json (scores.csv, TensorBoard events beside it)")
    return "\n".join(lines)
