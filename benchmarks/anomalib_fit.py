"""One anomalib peer's fit + test, end to end from the image files, in this process.

``benchmarks/peak_memory.py --peers`` runs this script in a fresh process per peer, as it runs
``anomaly fit`` for our configs. anomalib's own Lightning model (``Dfm``, ``Padim`` or
``Patchcore``) is fitted and tested by anomalib's ``Engine`` on the CPU, from anomalib's ``Folder``
data module over three folders (of links) that peak_memory.py writes: the fitting images of our
fold, the normal and the defective test images. There is no validation split
(``val_split_mode="none"``, ``limit_val_batches=0``), so every test image is tested and none is
scored twice. With ``--holdout HOLDOUT`` (the fold's held-out normal images, a fourth folder) the
peer does what ``anomaly fit`` does besides fitting and testing: anomalib's validation split takes
as many of the normal images of FIT and HOLDOUT together as HOLDOUT holds (``val_split_mode
"from_train"``, seeded), and its post-processor sets the threshold there (all normal: at their
largest score, as ``anomaly fit`` does on 48 held-out images at 1% false positives).

The peers' settings are those of ``benchmarks/compare_peers.py`` (their defaults, the timm layers
mapped onto our efficientnet-lite0 levels by stride, PaDiM's 100 random channels, PatchCore's
coreset ratio), and their timm feature extractor is replaced by ``compare_peers.TimmLevels``: the
same ImageNet weights as ours. The pre-processor resizes to our input size (224 px) and does
not normalise (our extractor does). The visualizer is off: anomalib's default would write an
image of every test result. anomalib's evaluator is off too: without a validation set its
post-processor leaves the scores unnormalised, and torchmetrics' AUROC takes scores outside
[0, 1] for logits (all near 1 after its sigmoid: 0.5 whatever the ranking). The image AUROC is
instead computed from the raw test scores, as compare_peers.py computes it for every method.
The results (image AUROC, the fit and test seconds, the checkpoint's size, the images fitted,
validated and tested) are written whole as JSON to ``OUT/results.json``. ``OUT`` must be a new or
empty folder, or one this script wrote before (it records what it wrote, as ``anomaly predict
--maps`` does); it is checked before anything is fitted.

    python benchmarks/anomalib_fit.py "anomalib DFM" --fit FIT --good GOOD --defect DEFECT --out OUT \
        [--holdout HOLDOUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback  # anomalib's Lightning (``lightning``)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_peers import (
    BACKBONE,
    DFM_LAYER,
    PADIM_FEATURES,
    PADIM_LAYERS,
    PATCHCORE_LAYERS,
    PATCHCORE_RATIOS,
    PEERS,
    TIMM_NAME,
    TimmLevels,
    worker_count,
)

from anomaly.backbones import build_backbone
from anomaly.console import run_command
from anomaly.evaluation.metrics import image_auroc
from anomaly.outputs import OutputFolder, write_json

COMMAND = "benchmarks/anomalib_fit.py"


class TestScores(Callback):
    """A Lightning callback that keeps the raw image scores and labels of the test batches."""

    def __init__(self) -> None:
        super().__init__()
        self.scores, self.labels, self.paths = [], [], []

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.scores.append(outputs.pred_score.detach().flatten().double())
        self.labels.append(outputs.gt_label.detach().flatten().long())
        self.paths += list(outputs.image_path)


def build_peer(name: str):
    """anomalib's Lightning model for a peer of ``compare_peers.PEERS``, on our extractor's levels."""
    from anomalib.models import Dfm, Padim, Patchcore
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Resize

    extractor = build_backbone(BACKBONE)
    size = extractor.image_size
    # pre_trained=False builds timm's lite0 without a hub download; its extractor is replaced below
    common = {
        "pre_trained": False,
        "pre_processor": PreProcessor(transform=Resize((size, size), antialias=True)),
        "visualizer": False,
        "evaluator": False,
    }
    ratios = {f"anomalib PatchCore {r:.0%}": r for r in PATCHCORE_RATIOS}
    if name == "anomalib DFM":
        model, layers = Dfm(backbone=TIMM_NAME, layer=DFM_LAYER, **common), [DFM_LAYER]
    elif name == "anomalib PaDiM":
        torch.manual_seed(0)  # PaDiM's random channel choice
        model = Padim(backbone=TIMM_NAME, layers=PADIM_LAYERS, n_features=PADIM_FEATURES, **common)
        layers = PADIM_LAYERS
    else:
        torch.manual_seed(0)  # the coreset's random first centre
        model = Patchcore(
            backbone=TIMM_NAME, layers=PATCHCORE_LAYERS, coreset_sampling_ratio=ratios[name], **common
        )
        layers = PATCHCORE_LAYERS
    model.model.feature_extractor = TimmLevels(extractor, layers)
    return model


def validation_split(fit: Path, holdout: Path | None) -> dict:
    """Folder's normal images and validation split: none without ``holdout``; with it, the fitting
    and held-out images together, of which anomalib's validation takes as many as were held out (at
    random, seeded): its post-processor sets the threshold there, at the largest normal score when
    the validation images are all normal, as ``anomaly fit`` does on its held-out fifth."""
    if holdout is None:
        return {"normal_dir": fit, "val_split_mode": "none"}
    fitted, held_out = (len(list(folder.iterdir())) for folder in (fit, holdout))
    ratio = held_out / (fitted + held_out)
    return {"normal_dir": [fit, holdout], "val_split_mode": "from_train", "val_split_ratio": ratio, "seed": 0}


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: fit_and_test(argv))


def fit_and_test(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("peer", choices=PEERS)
    parser.add_argument("--fit", type=Path, required=True, help="folder of the fitting images")
    parser.add_argument("--good", type=Path, required=True, help="folder of the normal test images")
    parser.add_argument("--defect", type=Path, required=True, help="folder of the defective test images")
    parser.add_argument(
        "--holdout", type=Path, default=None,
        help="folder of the held-out normal images: the peer then sets its threshold as anomaly fit does, "
        "on a validation split of as many normal images (of --fit and --holdout together)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="anomalib's run folder; results.json")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--num-workers", type=worker_count, default=0, metavar="N|default",
        help="data loader worker processes (default 0); 'default': anomalib Folder's own default",
    )  # fmt: skip
    args = parser.parse_args(argv)
    folders = (args.fit, args.good, args.defect, *([args.holdout] if args.holdout else []))
    inputs = [p for folder in folders for p in sorted(folder.glob("*"))]
    (results_file,) = OutputFolder(args.out, option="--out", command=COMMAND).claim(["results.json"], inputs)
    warnings.filterwarnings("ignore")

    from anomalib.data import Folder
    from anomalib.engine import Engine

    model = build_peer(args.peer)
    data = Folder(
        name="category", root=None, normal_test_dir=args.good, abnormal_dir=args.defect,
        train_batch_size=args.batch_size, eval_batch_size=args.batch_size, test_split_mode="from_dir",
        **({} if args.num_workers is None else {"num_workers": args.num_workers}),
        **validation_split(args.fit, args.holdout),
    )  # fmt: skip
    tested_scores = TestScores()
    engine = Engine(
        accelerator="cpu", devices=1, logger=False, default_root_dir=args.out, enable_progress_bar=False,
        limit_val_batches=1.0 if args.holdout else 0, callbacks=[tested_scores],
    )  # fmt: skip
    started = time.perf_counter()
    engine.fit(model=model, datamodule=data)
    fitted = time.perf_counter()
    engine.test(model=model, datamodule=data, verbose=False)
    tested = time.perf_counter()
    scores, labels = torch.cat(tested_scores.scores), torch.cat(tested_scores.labels)
    checkpoints = sorted(args.out.rglob("*.ckpt"))
    result = {
        "peer": args.peer,
        "n_fit": len(data.train_data),
        "n_validation": len(data.val_data) if args.holdout else 0,
        "n_test": len(tested_scores.paths),
        "n_test_defective": int(labels.sum()),
        "image_auroc": image_auroc(scores, labels),
        "fit_seconds": fitted - started,
        "test_seconds": tested - fitted,
        "checkpoint_bytes": checkpoints[-1].stat().st_size if checkpoints else None,
    }
    write_json(results_file, result, command=COMMAND)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
