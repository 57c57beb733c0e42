"""Plain-text summaries of a run for the console."""

from __future__ import annotations

from anomaly.evaluation.aggregate import ALL_FOLDS


def _fmt(value: float | None) -> str:
    return "   -  " if value is None else f"{100 * value:6.1f}"


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
    if "run_dir" in results:
        lines.append(f"results: {results['run_dir']}/results.json (scores.csv, TensorBoard events beside it)")
    return "\n".join(lines)
