"""Aggregation: the paper's per-category means, mean ± SEM, and the warnings for gaps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from anomaly.evaluation.aggregate import (
    collect_runs,
    completeness_warnings,
    deduplicate,
    group_runs,
    load_run,
    missing_value_warnings,
    summarise,
    summarise_column,
)
from anomaly.evaluation.evaluate import build_tables
from tests.evaluation.fake_runs import fake_results, write_fake_run

VALUES = {("bottle", 0): 0.90, ("bottle", 1): 0.94, ("cable", 0): 0.70, ("cable", 1): 0.80, ("grid", 0): 0.60}


def test_mean_and_sem_over_per_category_means():
    summary = summarise(VALUES)
    per_category = {"bottle": 0.92, "cable": 0.75, "grid": 0.60}
    assert summary.per_category == pytest.approx(per_category)
    means = list(per_category.values())
    assert summary.mean == pytest.approx(np.mean(means))
    assert summary.sem == pytest.approx(stats.sem(means))  # ddof=1 over categories, not over runs
    assert summary.sem_over == "categories"
    assert summary.folds == {"bottle": [0, 1], "cable": [0, 1], "grid": [0]}


def test_single_category_sem_is_over_folds():
    folds = [0.91, 0.95, 0.97, 0.90, 0.99]
    summary = summarise({("bottle", k): v for k, v in enumerate(folds)})
    assert summary.mean == pytest.approx(np.mean(folds))
    assert summary.sem == pytest.approx(stats.sem(folds))
    assert summary.sem_over == "folds"
    one = summarise({("bottle", 0): 0.9})
    assert one.mean == pytest.approx(0.9) and one.sem is None and one.sem_over is None


def test_undefined_values_are_left_out():
    summary = summarise({("a", 0): 0.8, ("a", 1): None, ("b", 0): 0.6})
    assert summary.per_category == pytest.approx({"a": 0.8, "b": 0.6})
    assert summarise({("a", 0): None}).mean is None


def test_collect_groups_and_skips_bad_files(tmp_path: Path):
    for (category, fold), auroc in VALUES.items():
        write_fake_run(tmp_path, fake_results(category, fold, auroc))
    write_fake_run(
        tmp_path, fake_results("bottle", 0, 0.5, settings={"reduction": "npca"}), "lite0_npca-0.99"
    )
    corrupt = tmp_path / "gaussian" / "broken" / "bottle" / "fold_0" / "results.json"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_text('{"method": "gaussian", "scor')
    incomplete = write_fake_run(tmp_path, {**fake_results("cable", 2, 0.7)}, "partial")
    data = json.loads(incomplete.read_text())
    del data["scores"]
    incomplete.write_text(json.dumps(data))

    records, problems = collect_runs(tmp_path)
    assert len(records) == 6
    assert len(problems) == 2
    assert any(str(corrupt) in p and "unreadable" in p for p in problems)
    assert any(str(incomplete) in p and "missing scores" in p for p in problems)

    groups = group_runs(records)
    assert sorted(k.variant for k in groups) == ["efficientnet-lite0", "lite0_npca-0.99"]
    plain = next(v for k, v in groups.items() if k.variant == "efficientnet-lite0")
    summary = summarise_column(plain, "l2", "2")  # l2 is 0.1 below, level 2 another 0.02
    assert summary.mean == pytest.approx(summarise(VALUES).mean - 0.12)
    assert summarise_column(plain, None).mean == pytest.approx(summarise(VALUES).mean)


def test_warnings_name_missing_folds_and_categories(tmp_path: Path):
    records = [load_run(write_fake_run(tmp_path, fake_results(c, f, v))) for (c, f), v in VALUES.items()]
    lines = completeness_warnings("gaussian/lite0", records, ["bottle", "cable", "grid", "screw"], [0, 1])
    assert any("no runs for categories screw" in line for line in lines)
    assert any("grid lacks folds 1" in line for line in lines)
    assert not any("bottle" in line for line in lines)
    assert completeness_warnings("x", records[:2], ["bottle"], [0, 1]) == []


def test_missing_columns_and_duplicates_are_reported(tmp_path: Path):
    results = fake_results("bottle", 0, 0.9)
    results["scores"]["sed"]["sum"] = None
    record = load_run(write_fake_run(tmp_path, results))
    assert missing_value_warnings("g", [record], "sed", "sum") == [
        "g: sed/sum is missing or undefined for bottle fold 0 (left out)"
    ]
    again = load_run(write_fake_run(tmp_path / "other", fake_results("bottle", 0, 0.8)))
    kept, warnings = deduplicate([record, again])
    assert len(kept) == 1 and len(warnings) == 1 and "2 runs" in warnings[0]


def test_fits_on_all_images_are_a_group_of_their_own(tmp_path: Path):
    """fold_all runs are another protocol: they must not enter the 5-fold means, nor make folds 'missing'."""
    for (category, fold), auroc in VALUES.items():
        write_fake_run(tmp_path, fake_results(category, fold, auroc))
    write_fake_run(tmp_path, fake_results("bottle", None, 0.99))
    groups = group_runs(collect_runs(tmp_path)[0])
    assert [(k.label, len(v)) for k, v in groups.items()] == [
        ("gaussian/efficientnet-lite0", 5),
        ("gaussian/efficientnet-lite0 (fold all)", 1),
    ]
    folds, whole = groups.values()
    assert summarise_column(folds, None).per_category == pytest.approx(summarise(VALUES).per_category)
    assert summarise_column(whole, None).per_category == pytest.approx({"bottle": 0.99})
    tables, warnings = build_tables(groups)
    assert warnings == [  # grid lacks fold 1 in VALUES; no group lacks the other protocol's folds
        "gaussian/efficientnet-lite0: grid lacks folds 1 (its mean is over folds 0 only)",
        "gaussian/efficientnet-lite0 (fold all): no runs for categories cable, grid",
    ]
    assert any("(fold all)" in table.title for table in tables)


def test_categories_of_another_dataset_are_not_averaged_in(tmp_path: Path):
    for (category, fold), auroc in VALUES.items():
        results = {**fake_results(category, fold, auroc), "dataset": "/data/mvtec_ad"}
        write_fake_run(tmp_path / "mvtec", results)
    tiles = {**fake_results("magnetic_tile", 0, 0.5), "dataset": "/data/magnetic_tile"}
    write_fake_run(tmp_path / "tiles", tiles)
    groups = group_runs(collect_runs(tmp_path)[0])
    assert sorted((k.dataset, len(v)) for k, v in groups.items()) == [
        ("/data/magnetic_tile", 1),
        ("/data/mvtec_ad", 5),
    ]
    mvtec = next(v for k, v in groups.items() if k.dataset == "/data/mvtec_ad")
    assert summarise_column(mvtec, None).mean == pytest.approx(summarise(VALUES).mean)
    tables, _ = build_tables(groups)
    assert any("data /data/magnetic_tile" in note for table in tables for note in table.notes)
