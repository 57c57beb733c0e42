"""Peak memory and wall time of fit + test, end to end, for our configs and anomalib's peers side by side.

Each config runs ``anomaly fit`` (fit and test) in a fresh Python process on one folder category;
the peak resident memory (RSS) is that of the process (``ru_maxrss``; ``--data.num_workers 0``, so
that one process holds everything), the wall time that of the whole command. ``--num-workers N``
has every side load its images in N worker processes instead (ours with ``--data.num_workers N``,
the peers with anomalib's ``num_workers``), and ``--num-workers default`` with each side's own
default (``anomaly fit``'s, a worker per core but one, up to 4; anomalib ``Folder``'s, 8). The
peak RSS is then the largest process's; the group RSS column sums all of a run's processes
(polled every second, shared pages counted in each), and the group PSS column shares each page
among the processes that hold it: what the group as a whole holds. ``--peers`` adds
anomalib's DFM, PaDiM and PatchCore (``benchmarks/anomalib_fit.py``), each in a fresh process too,
end to end from the same image files: anomalib's Lightning model and ``Engine``, fitted on exactly
the images ``anomaly fit`` fits (its fold of ``ROOT/normal``, read from our data module) and
tested on all the test images, with the same efficientnet-lite0 weights at the same 224 px input.
``--peers-threshold`` has the peers also set a threshold, as ``anomaly fit`` does on the fold's
held-out normal images: anomalib's validation on as many normal images (``anomalib_fit.py
--holdout``; the method is then labelled ``PEER, threshold``).
``--rounds`` repeats everything, the methods alternating so that they share the machine's load
(every other round in the reverse order);
each run is killed above ``--max-rss-gb`` or after ``--time-limit`` s, and a run that fails
leaves its last lines of output on stderr and in ``--out``'s JSON. ``--out`` is written whole at
the end (``{"written_by": "benchmarks/peak_memory.py", "results": [...]}``); an existing file
that this script did not write is refused before any work, unless ``--overwrite``. ``--make
SOURCE`` first writes a category of large images from the images of an MVTec AD category
``SOURCE`` (resized to ``--size``, flipped copies where more are needed) in the layout of
``anomaly.data.folder.FolderDataModule``: ``ROOT/normal`` and ``ROOT/test/{good,defect}``, into a
new (or empty) ``ROOT``, which appears only once every image is written.

    python benchmarks/peak_memory.py /tmp/large_bottle --make ../shared/data/mvtec_ad/bottle
    python benchmarks/peak_memory.py /tmp/large_bottle --configs recommended spatial_grid_maps
    python benchmarks/peak_memory.py /tmp/large_bottle --configs recommended --rounds 2 \\
        --peers "anomalib DFM" "anomalib PaDiM" "anomalib PatchCore 1%"

The peers need anomalib (``pip install -e '.[bench]'``) in the Python that runs this script; our
configs run in the same Python. The commands run this clone's code, or with
``PYTHONPATH=OTHER_CLONE`` another clone's (for a before/after comparison on one machine).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import cv2
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_peers import DEFAULT_WORKERS, PEERS, watch, worker_count

from anomaly.atomic import built_whole
from anomaly.configs import resolve_config
from anomaly.console import run_command
from anomaly.data.folder import FolderDataModule
from anomaly.errors import UserError
from anomaly.outputs import claim_json, claim_new_folder, write_json

CLONE = Path(__file__).resolve().parents[1]
COMMAND = "benchmarks/peak_memory.py"
CONFIGS = ["recommended", "spatial_grid", "spatial_grid_maps", "paper"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
MIB = 2**20
#: Lines of a failed run's output kept with its result (and printed).
LOG_LINES = 10


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and "mask" not in p.name)


def make_category(root: Path, source: Path, size: int, normal: int, good: int, defects: int) -> None:
    """``normal`` + ``good`` + ``defects`` images of ``size`` px from an MVTec AD category, in a new
    (or empty) ``root`` that appears whole once every image is written."""
    root = claim_new_folder(root, option="ROOT", command=f"{COMMAND} --make")
    train = images_in(source / "train" / "good")
    test_good = images_in(source / "test" / "good")
    test_bad = [p for p in images_in(source / "test") if p.parent.name != "good"]
    plan = {"normal": (train, normal), "test/good": (test_good, good), "test/defect": (test_bad, defects)}
    empty = next((folder for folder, (paths, _) in plan.items() if not paths), None)
    if empty is not None:
        raise UserError(f"--make {source} has no images for {empty}: give an MVTec AD category folder")
    with built_whole(root) as building:
        for folder, (paths, count) in plan.items():
            (building / folder).mkdir(parents=True)
            for i in range(count):
                image = cv2.imread(str(paths[i % len(paths)]), cv2.IMREAD_COLOR)
                if (i // len(paths)) % 2:
                    image = cv2.flip(image, 1)
                image = cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC)
                (building / folder / f"{i:04d}.png").write_bytes(cv2.imencode(".png", image)[1].tobytes())


def fold_folders(root: Path, folder: Path) -> dict[str, int]:
    """Links to the images that ``anomaly fit --config folder --data.root ROOT`` fits, holds out and tests.

    The data module is the one ``configs/folder.yaml`` builds (its fold and split), so ``FOLDER/fit``
    holds exactly the fold's fitting images, ``FOLDER/holdout`` its held-out normal images (where
    ``anomaly fit`` sets the threshold), ``FOLDER/good`` and ``FOLDER/defect`` every test image by
    label. Returns the number of images in each.
    """
    init_args = yaml.safe_load(Path(resolve_config("folder")).read_text())["data"]["init_args"]
    data = FolderDataModule(**{**init_args, "root": str(root.resolve()), "num_workers": 0})
    test = data.test_samples
    groups = {
        "fit": data.fit_samples,
        "holdout": data.holdout_samples,
        "good": [s for s in test if s.label == 0],
        "defect": [s for s in test if s.label == 1],
    }
    for name, samples in groups.items():
        (folder / name).mkdir(parents=True)
        for i, sample in enumerate(samples):  # numbered: images of several test folders may share a name
            (folder / name / f"{i:04d}_{Path(sample.path).name}").symlink_to(Path(sample.path).resolve())
    return {name: len(samples) for name, samples in groups.items()}


def run(argv: list[str], out: Path, args: argparse.Namespace) -> dict:
    """Peak RSS (MiB), wall and CPU time (s) and outcome of one fresh process writing under ``out``."""
    # from the scratch folder: ``python -m`` puts the working directory first on the path
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH") or str(CLONE)}
    out.mkdir(parents=True)
    load = os.getloadavg()[0]
    report = watch(argv, args.max_rss_gb, args.time_limit, log=out / "output.log", cwd=out, env=env)
    failed = report["returncode"] != 0
    return {
        "exit_code": report["returncode"],
        "stopped": report["stopped"],
        "peak_rss_mib": report["peak_rss_bytes"] / MIB,
        "group_peak_rss_mib": report["group_peak_rss_bytes"] / MIB,
        "group_peak_pss_mib": report["group_peak_pss_bytes"] / MIB,
        "seconds": report["wall_seconds"],
        "cpu_seconds": report["cpu_seconds"],
        "load_1min": load,
        # the scratch folder goes at the end: what a failed run said is kept with its result
        "output_tail": (out / "output.log").read_text().splitlines()[-LOG_LINES:] if failed else [],
    }


def round_order(configs: list[str], peers: list[str], round_: int) -> list[tuple[str, str]]:
    """``("config" | "peer", name)`` in the order round ``round_`` (from 0) runs them: our configs,
    then the peers, and every other round the other way round, so that no method always goes first
    (the machine's speed drifts within a round)."""
    order = [("config", name) for name in configs] + [("peer", name) for name in peers]
    return order[::-1] if round_ % 2 else order


def measure_config(config: str, root: Path, out: Path, args: argparse.Namespace) -> dict:
    """One ``anomaly fit --config folder --config CONFIG`` (fit + test); CONFIG a shipped name or a file."""
    method = f"ours: {Path(config).stem}"
    if Path(config).is_file():
        config = str(Path(config).resolve())  # the command runs in the scratch folder
    command = [
        sys.executable, "-m", "anomaly", "fit", "--config", "folder", "--config", config,
        "--data.root", str(root.resolve()),
        *([] if args.num_workers is None else ["--data.num_workers", str(args.num_workers)]),
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(out / "run"),
    ]  # fmt: skip
    result = {"method": method, **run(command, out, args)}
    results = sorted(out.rglob("results.json"))
    metrics = json.loads(results[-1].read_text()) if results else {}
    result["image_auroc"], result["pixel_auroc"] = metrics.get("image_auroc"), metrics.get("pixel_auroc")
    result["saved_mib"] = sum(p.stat().st_size for p in out.rglob("detector.safetensors")) / MIB
    return result


def measure_peer(peer: str, folders: Path, out: Path, args: argparse.Namespace) -> dict:
    """One anomalib peer's fit + test (``benchmarks/anomalib_fit.py``) on the fold's links."""
    command = [sys.executable, str(Path(__file__).resolve().parent / "anomalib_fit.py"), peer]
    names = ("fit", "good", "defect", *(["holdout"] if args.peers_threshold else []))
    command += [arg for name in names for arg in (f"--{name}", str(folders / name))]
    command += ["--num-workers", DEFAULT_WORKERS if args.num_workers is None else str(args.num_workers)]
    method = f"{peer}, threshold" if args.peers_threshold else peer
    result = {"method": method, **run([*command, "--out", str(out / "run")], out, args)}
    path = out / "run" / "results.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    result["image_auroc"], result["pixel_auroc"] = metrics.get("image_auroc"), None
    checkpoint = metrics.get("checkpoint_bytes")
    result["saved_mib"] = None if checkpoint is None else checkpoint / MIB
    result["images"] = metrics.get("n_fit"), metrics.get("n_test")
    if args.peers_threshold:
        result["validation_images"] = metrics.get("n_validation")
    return result


def report(result: dict) -> None:
    """The result's table row; a failed run's last lines of output on stderr."""
    print(row(result), flush=True)
    if result["output_tail"]:
        print(f"{result['method']} failed; its last lines of output:", file=sys.stderr)
        print("\n".join("    " + line for line in result["output_tail"]), file=sys.stderr, flush=True)


def row(r: dict) -> str:
    auroc, pixel = ("-" if r[k] is None else f"{r[k]:.4f}" for k in ("image_auroc", "pixel_auroc"))
    saved = "-" if r["saved_mib"] is None else f"{r['saved_mib']:.0f}"
    outcome = r["stopped"] or str(r["exit_code"])
    return (
        f"| {r['method']} | {r['peak_rss_mib']:.0f} | {r['seconds']:.0f} | {r['cpu_seconds']:.0f} | {auroc} "
        f"| {pixel} | {saved} | {r['load_1min']:.2f} "
        f"| {r['group_peak_rss_mib']:.0f} | {r['group_peak_pss_mib']:.0f} | {outcome} |"
    )


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: measure(argv))


def measure(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="the category: ROOT/normal and ROOT/test/<type>")
    parser.add_argument("--configs", nargs="*", default=CONFIGS, help="our configs; default: %(default)s")
    parser.add_argument(
        "--peers", nargs="+", default=[], choices=PEERS, metavar="PEER",
        help="anomalib's peers, by compare_peers.py's names: " + ", ".join(PEERS).replace("%", "%%"),
    )  # fmt: skip
    parser.add_argument(
        "--peers-threshold", action="store_true",
        help="the peers set a threshold too, as anomaly fit does: anomalib's validation on as many held-out "
        "normal images (anomalib_fit.py --holdout)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="runs of every method, alternating")
    parser.add_argument(
        "--num-workers", type=worker_count, default=0, metavar="N|default",
        help="data loader worker processes on every side (default 0: one process holds everything); "
        "'default': each side's own default (anomaly fit's, anomalib Folder's)",
    )  # fmt: skip
    parser.add_argument("--max-rss-gb", type=float, default=8.0, help="kill a run above this RSS (GB)")
    parser.add_argument("--time-limit", type=float, default=1800.0, help="kill a run after these seconds")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument(
        "--overwrite", action="store_true", help="let --out replace a file that is not an earlier result"
    )
    parser.add_argument(
        "--make", type=Path, default=None, help="write ROOT first from this MVTec AD category"
    )
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument(
        "--counts", nargs=3, type=int, default=[240, 20, 40], metavar=("NORMAL", "GOOD", "DEFECT")
    )
    args = parser.parse_args(argv)
    if args.out is not None:  # claimed before any work: never an input, nor a file of another origin
        inputs = [*images_in(args.root), *(Path(c) for c in args.configs if Path(c).is_file())]
        args.out = claim_json(args.out, command=COMMAND, inputs=inputs, overwrite=args.overwrite)
    if args.peers and importlib.util.find_spec("anomalib") is None:
        print(
            f"error: --peers needs anomalib, which {sys.executable} lacks: pip install -e '.[bench]' "
            "into an environment and run this script with its python",
            file=sys.stderr,
        )
        return 2
    if args.rounds < 1:
        print(f"error: --rounds must be at least 1, got {args.rounds}", file=sys.stderr)
        return 2
    if args.make is not None:
        make_category(args.root, args.make, args.size, *args.counts)
    if not (args.root / "normal").is_dir():
        print(
            f"error: {args.root}/normal does not exist: give --make SOURCE to write the category",
            file=sys.stderr,
        )
        return 2
    print(f"{len(images_in(args.root))} images in {args.root}", file=sys.stderr)
    print(
        "| method | peak RSS (MiB) | fit + test (s) | CPU (s) | image AUROC | pixel AUROC | saved (MiB) "
        "| load (1 min) | group RSS (MiB) | group PSS (MiB) | exit |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        if args.peers:
            counts = fold_folders(args.root, Path(scratch) / "fold")
            print(f"fold: {counts['fit']} fitting images, {counts['holdout']} held out, "
                  f"{counts['good']} + {counts['defect']} tested", file=sys.stderr)  # fmt: skip
        for round_ in range(args.rounds):
            for kind, name in round_order(args.configs, args.peers, round_):
                if kind == "config":
                    out = Path(scratch) / f"{round_}_{Path(name).stem}"
                    results.append(measure_config(name, args.root, out, args))
                else:
                    out = Path(scratch) / f"{round_}_{name.replace(' ', '_').replace('%', 'pc')}"
                    results.append(measure_peer(name, Path(scratch) / "fold", out, args))
                report(results[-1])
    if args.out is not None:
        write_json(args.out, {"results": results}, command=COMMAND)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
