"""Synthetic ``results.json`` files in the run-directory layout, for the aggregation tests."""

from __future__ import annotations

import json
from pathlib import Path

LEVELS = ("1", "2", "3")
TYPES = ("mahalanobis", "l2", "sed")


def fake_results(
    category: str, fold: int | None, auroc: float, method: str = "gaussian",
    backbone: str = "efficientnet-lite0", settings: dict | None = None, working_point: dict | None = None,
) -> dict:  # fmt: skip
    """Results whose every column is ``auroc`` shifted by a fixed offset per score type and level."""
    scores = {}
    for t, score_type in enumerate(TYPES):
        per_level = {lv: auroc - 0.1 * t - 0.01 * int(lv) for lv in LEVELS}
        scores[score_type] = {"sum": auroc - 0.1 * t, "per_level": per_level}
    results = {
        "method": method, "backbone": backbone, "category": category, "fold": fold,
        "primary_score": "mahalanobis/sum", "image_auroc": auroc,
        "per_level": scores["mahalanobis"]["per_level"], "scores": scores,
        "settings": {"backbone": backbone, "levels": None, **(settings or {})},
    }  # fmt: skip
    if working_point is not None:
        results["working_point"] = working_point
    return results


def write_fake_run(root: Path, results: dict, name: str | None = None) -> Path:
    """``<root>/<method>/<name>/<category>/fold_<k>/results.json``."""
    run_dir = Path(root) / results["method"] / (name or results["backbone"]) / results["category"]
    run_dir = run_dir / ("fold_all" if results["fold"] is None else f"fold_{results['fold']}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir / "results.json"


def working_point_section(fpr: float, tpr: float, level: str = "7") -> dict:
    """The ``working_point`` layout the Gaussian method writes: n·σ rows and the target-FPR row."""
    rows = [
        {"n_sigma": n, "target_fpr": target, "chi2_threshold": 10.0 + n, "chi2_fpr": fpr / n, "chi2_tpr": tpr,
         "empirical_threshold": 9.0 + n, "empirical_fpr": fpr, "empirical_tpr": tpr}
        for n, target in ((1, 0.3173), (2, 0.0455))
    ] + [{"n_sigma": None, "target_fpr": 0.01, "empirical_threshold": 12.5, "empirical_fpr": fpr,
          "empirical_tpr": tpr}]  # fmt: skip
    return {"target_fpr": 0.01, "levels": {level: {"dim": 16, "rows": rows}}, "empirical": {}}
