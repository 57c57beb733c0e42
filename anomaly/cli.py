"""The command line: LightningCLI that fits and then tests one (category, fold).

``anomaly fit`` (or ``python train.py``) with no arguments runs the embedded offline demo
(``configs/default.yaml``) with the recommended detector (``configs/recommended.yaml``). Every
option can be set in a YAML file (``--config FILE``) or with dotted overrides (``--model.backbone resnet18``).
Runs are written to ``<trainer.default_root_dir>/<method>/<name>/<category>/fold_<k>/``: the
trainer's :class:`~anomaly.evaluation.callback.RunReport` writes the test's files, and the fit is
:func:`anomaly.methods.run.fit` (the data obey the model's needs; fit; calibrate).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import sys
import warnings
from pathlib import Path

import yaml
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning import Callback, Trainer
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import TensorBoardLogger

from anomaly.arguments import check_config_file, check_expanded_values, config_files, one_line_parse_error
from anomaly.configs import CONFIG_DIR, DEFAULT_CONFIGS, resolve_config_args  # noqa: F401 (CONFIG_DIR: grids)
from anomaly.console import raise_if_interrupted, run_command
from anomaly.data.datamodule import AnomalyDataModule
from anomaly.data.images import collect_images
from anomaly.data.transforms import DEFAULT_FIT, DEFAULT_RESIZE
from anomaly.detector.run import run_detector_paths, save_run_detector
from anomaly.errors import ArgumentsError
from anomaly.evaluation.callback import RunReport
from anomaly.evaluation.report import format_run_table, threshold_line
from anomaly.evaluation.results import run_result_paths
from anomaly.methods.base import AnomalyMethod
from anomaly.methods.distributed import resolve_strategy, statistics_replacement
from anomaly.methods.run import fit
from anomaly.runfolder import hold_run_folder, replacing_outputs


def run_dir_parts(
    model: AnomalyMethod, data: AnomalyDataModule, epochs: int | None, precision: object = None
) -> tuple[str, str]:
    """(``<method>/<name>/<category>``, ``fold_<k>``) of a run, relative to the root dir.

    A resolution other than the backbone's adds ``_<size>px``, a resize rule other than
    ``area`` ``_resize-<rule>``, a fit rule other than ``stretch`` ``_fit-<rule>``, tiles
    ``_tiles-<rows>x<cols>``, a precision other than
    float32 ``_<precision>``. Augmented runs end in ``_augment``; for methods that
    stream every augmented pass into their fit (Gaussian, oc-SVM) the number of passes
    follows (``_augment100``), a seed other than 0 ``_seed<k>``, and each augmentation switch
    given by hand ``_<switch>-<value>`` (e.g. ``_rotate90-false``).
    """
    fold = "fold_all" if data.fold is None else f"fold_{data.fold}"
    name = model.run_name()
    if data.image_size is not None and data.image_size != model.data_needs().image_size:
        name += f"_{data.image_size}px"  # not the backbone's native resolution
    if getattr(data, "resize", DEFAULT_RESIZE) != DEFAULT_RESIZE:
        name += f"_resize-{data.resize}"
    if getattr(data, "fit", DEFAULT_FIT) != DEFAULT_FIT:
        name += f"_fit-{data.fit}"
    if getattr(data, "tiles", "1x1") != "1x1":
        name += f"_tiles-{data.tiles}"
    if precision is not None and str(precision) not in ("32", "32-true"):
        name += f"_{precision}"
    if data.augment:
        counted = model.epochs_are_samples and epochs is not None and epochs > 0
        name += f"_augment{epochs}" if counted else "_augment"
        name += f"_seed{data.seed}" if data.seed else ""
        given = data.augment_options.given() if getattr(data, "augment_options", None) else {}
        name += "".join(f"_{key}-{value:g}" if isinstance(value, float) else f"_{key}-{str(value).lower()}"
                        for key, value in sorted(given.items()))  # fmt: skip
    return f"{model.method_name}/{name}/{data.category}", fold


class AnomalyCLI(LightningCLI):
    """LightningCLI whose logger writes into the run's own directory, and whose trainer reports the
    test (:attr:`report`, a :class:`~anomaly.evaluation.callback.RunReport`)."""

    report: RunReport

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--figures",
            type=bool,
            default=True,
            help="after the test, write the run's PNGs and TensorBoard figures and images (false in "
            "sweeps: drawing takes about a second a run; results, scores and histograms are kept)",
        )

    def instantiate_trainer(self, **kwargs) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        root = config.get("default_root_dir") or "runs"
        if Path(root).exists() and not Path(root).is_dir():
            raise ArgumentsError(f"--trainer.default_root_dir {root} is a file: give a folder for the runs")
        epochs, precision = config.get("max_epochs"), config.get("precision")
        name, version = run_dir_parts(self.model, self.datamodule, epochs, precision)
        if config.get("logger", True) is not False:
            kwargs["logger"] = TensorBoardLogger(
                save_dir=root, name=name, version=version, default_hp_metric=False
            )
        kwargs["default_root_dir"] = root
        self.report = RunReport(figures=bool(self.config.get("figures", True)))
        given = config.get("callbacks") or []
        kwargs["callbacks"] = [
            *(given if isinstance(given, list) else [given]),
            self.report,
            StopOnInterrupt(),
        ]
        kwargs["strategy"] = resolve_strategy(config.get("strategy", "auto"), self.model)
        try:
            trainer = super().instantiate_trainer(**kwargs)
            replacement = statistics_replacement(trainer.strategy, self.model)  # auto with several devices
            if replacement is not None:
                trainer = super().instantiate_trainer(**{**kwargs, "strategy": replacement})
        except MisconfigurationException as error:  # e.g. max_epochs -2, devices 0, accelerator gpu
            reason = str(error).rstrip(".!")
            raise ArgumentsError(f"--trainer: {reason}; check the --trainer options") from None
        refuse_partial_runs(trainer)
        refuse_substituted_precision(precision, trainer)
        return trainer


class StopOnInterrupt(Callback):
    """Stops the run at the next batch when a Ctrl-C or SIGTERM was swallowed on its way (e.g. in a
    data loader's finaliser): the command then ends as interrupted, with nothing written."""

    def on_train_batch_end(self, *args, **kwargs) -> None:
        raise_if_interrupted()

    on_test_batch_end = on_predict_batch_end = on_validation_batch_end = on_train_batch_end


def refuse_partial_runs(trainer: Trainer) -> None:
    """Debug options that cut the fit or the test short would write results that look complete."""
    if trainer.fast_dev_run:
        raise ArgumentsError("--trainer.fast_dev_run would fit and test on a single batch: leave it off")
    for name in ("limit_train_batches", "limit_test_batches"):
        value = getattr(trainer, name)
        if not (isinstance(value, float) and value == 1.0):  # an int is a number of batches
            raise ArgumentsError(f"--trainer.{name} {value} would leave images out of the run: keep 1.0")


def refuse_substituted_precision(requested: object, trainer: Trainer) -> None:
    """Lightning runs ``16-mixed`` as ``bf16-mixed`` on CPU; the run's name and config would say otherwise."""
    if str(requested).startswith("16") and str(trainer.precision).startswith("bf16"):
        raise ArgumentsError(
            f"--trainer.precision {requested} is not available on {type(trainer.accelerator).__name__} "
            f"(Lightning would run {trainer.precision} instead): ask for --trainer.precision "
            f"{trainer.precision} or 32"
        )


def quiet_lightning() -> None:
    """Keep the console to what a user needs: progress and the result table."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (
        ".*does not have many workers.*",
        ".*configure_optimizers` returned `None`.*",
        ".*Checkpoint directory.*exists and is not empty.*",
        ".*smaller than the logging interval.*",
        ".*GPU available but not used.*",
        ".*AMP with fp16 is not supported on CPU.*",  # refused: see refuse_substituted_precision
        ".*is an invalid version and will not be supported.*",
        ".*You passed in a `val_dataloader` but have no `validation_step`.*",
        ".*module\\(s\\) in eval mode at the start of training.*",
        ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
        # test metrics are computed from every process's gathered scores, so there is nothing to sync
        ".*It is recommended to use `self.log\\(.*sync_dist=True.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


FOLDER_DATA = "anomaly.data.folder.FolderDataModule"


def option_value(args: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` (the last one given), or None."""
    value = None
    for at, token in enumerate(args):
        if token == name and at + 1 < len(args):
            value = args[at + 1]
        elif token.startswith(name + "="):
            value = token.split("=", 1)[1]
    return value


def chooses_data_class(args: list[str]) -> bool:
    """Whether the arguments (or a ``--config`` file) pick the data module themselves."""
    if any(
        token in ("--data", "--data.class_path") or token.startswith(("--data=", "--data.class_path="))
        for token in args
    ):
        return True
    for path in config_files(args):
        with contextlib.suppress(OSError, yaml.YAMLError, AttributeError):
            data = (yaml.safe_load(Path(path).read_text()) or {}).get("data") or {}
            if "class_path" in data:
                return True
    return False


def folder_only_options() -> set[str]:
    """``--data.<name>`` options that only the folder data module has (``test_dirs``, ``masks``, ...)."""
    from anomaly.data.folder import FolderDataModule
    from anomaly.data.mvtec import MVTecDataModule

    names = set(inspect.signature(FolderDataModule).parameters) - set(
        inspect.signature(MVTecDataModule).parameters
    )
    return {f"--data.{name}" for name in names}


def own_images_args(args: list[str]) -> list[str]:
    """``--data.root DIR`` on a folder of images (not of categories) fits on those images.

    With no data module chosen, the default (MVTec AD layout) would look for category folders in
    ``DIR``; a folder that holds images, or any option only the folder data module has
    (``--data.test_dirs``), selects :class:`~anomaly.data.folder.FolderDataModule` instead, whose
    normal images are ``DIR``'s: normal-only unless ``--data.test_dirs`` names test folders.
    """
    root = option_value(args, "--data.root")
    if root is None or option_value(args, "--data.category") is not None or chooses_data_class(args):
        return args
    folder = Path(root).expanduser()
    a_category = (folder / "train").is_dir() and (folder / "test").is_dir()  # MVTec's layout, one level down
    holds_images = folder.is_dir() and not a_category and bool(collect_images(folder, warn=False))
    holds_categories = folder.is_dir() and any(p.is_dir() for p in folder.glob("*/train"))
    folder_options = any(token.split("=", 1)[0] in folder_only_options() for token in args)
    if holds_categories or not (holds_images or folder_options):
        return args
    first = next(at for at, token in enumerate(args) if token.startswith("--data."))
    return [*args[:first], "--data", FOLDER_DATA, *args[first:]]


def build_cli(args: list[str] | None = None) -> AnomalyCLI:
    """The CLI, parsed; an option the parser rejects raises :class:`ArgumentsError` (one line).

    ``--config`` takes a file or a shipped config's name; ``--data.root`` alone, on a folder of
    images rather than of categories, fits on those images (:func:`own_images_args`).
    """
    args = list(sys.argv[1:] if args is None else args)
    check_expanded_values(args)
    args = own_images_args(resolve_config_args(args))
    for path in config_files(args):
        if Path(path).is_file():  # a missing file is the parser's own message
            check_config_file(path)
    argv, sys.argv = sys.argv, sys.argv[:1]  # ``args`` is the command line: LightningCLI reads nothing else
    try:
        return AnomalyCLI(
            model_class=AnomalyMethod,
            datamodule_class=AnomalyDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            args=args,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                "prog": "anomaly fit",
                "default_config_files": [str(path) for path in DEFAULT_CONFIGS],
                "parser_mode": "omegaconf",
                "exit_on_error": False,
            },
            auto_configure_optimizers=False,
        )
    except argparse.ArgumentError as error:
        raise ArgumentsError(one_line_parse_error(str(error))) from None
    finally:
        sys.argv = argv


#: The files Lightning's CLI writes into a run folder.
RUN_CONFIG_FILES = ("config.yaml", "hparams.yaml")


def run_outputs(run_dir: Path) -> list[Path]:
    """What a run wrote into ``run_dir``: results, scores, figures, events, detector and config."""
    configs = [run_dir / name for name in RUN_CONFIG_FILES if (run_dir / name).exists()]
    return [*run_result_paths(run_dir), *run_detector_paths(run_dir), *configs]


def fit_and_test(args: list[str] | None = None) -> dict:
    """Parse the arguments, fit, test, and return the run's results.

    Data without test images (a folder of normal images only) are fitted and calibrated on the
    fold's held-out normal images, and saved, but not tested: ``results["tested"]`` is False.
    """
    quiet_lightning()
    cli = build_cli(args)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    run_dir, root = Path(trainer.log_dir or trainer.default_root_dir), Path(trainer.default_root_dir)
    detector = None
    first = trainer.is_global_zero
    with (
        hold_run_folder(run_dir, root, data.dataset, enabled=first),
        replacing_outputs(run_dir, run_outputs) if first else contextlib.nullcontext(),
    ):
        fit(trainer, model, data)
        raise_if_interrupted()
        if data.test_samples:
            trainer.test(model, datamodule=data, verbose=False)
        raise_if_interrupted()  # a swallowed interrupt: the run is not complete
        if first:
            detector = save_run_detector(model, data.image_size, run_dir, data.geometry, data)
    if not data.test_samples:
        return normal_only_summary(model, data, run_dir, detector)
    results = dict(cli.report.results or {})
    results["run_dir"] = str(run_dir)
    return results


def normal_only_summary(model, data: AnomalyDataModule, run_dir: Path, detector: Path | None) -> dict:
    """What a fit on normal images only produced: no AUROC, a calibrated detector."""
    threshold = getattr(model, "threshold", None)
    hparams = getattr(model, "hparams", {})
    empirical = getattr(model, "threshold_method", None) == "empirical" and hparams.get("threshold") is None
    return {
        "tested": False,
        "category": data.category,
        "n_fit": len(data.fit_samples),
        "n_holdout": len(data.holdout_samples),
        "threshold": threshold,
        "decision_score": getattr(model, "decision_score", None),
        "target_fpr": getattr(model, "target_fpr", None),
        "empirical_from": len(data.holdout_samples) if empirical else None,
        "detector": None if detector is None else str(detector),
        "run_dir": str(run_dir),
    }


def format_normal_only(summary: dict) -> str:
    """The console report of a fit without test images."""
    lines = [
        f"{summary['category']}: fitted on {summary['n_fit']} normal images, "
        f"{summary['n_holdout']} held out for the threshold",
    ]
    if summary["threshold"] is not None:
        score, fpr = summary["decision_score"], summary["target_fpr"]
        lines.append(threshold_line(summary["threshold"], score, fpr, summary["empirical_from"]))
    else:
        lines.append("threshold: none (no held-out images: use --data.fold 0..4, or set --model.threshold)")
    lines.append(
        "no AUROC: the data hold no anomalous images to measure it on; add test folders with "
        "--data.test_dirs (e.g. [test/*]) for the full report"
    )
    if summary["detector"]:
        lines.append(f"detector: {summary['detector']}   (anomaly predict --detector FILE --input IMAGES)")
    else:
        lines.append(f"run folder: {summary['run_dir']} (this method saves no detector)")
    return "\n".join(lines)


def print_help(args: list[str]) -> None:
    """Lightning's help, then the options of the model and data module the arguments select.

    In subclass mode Lightning's own help shows ``--model``/``--data`` only, not their options.
    """
    plain = [token for token in args if token not in ("-h", "--help")]
    with contextlib.suppress(SystemExit):
        build_cli(args)
    for group in ("model", "data"):
        class_path = selected_class(plain, group)
        print(f"\n=== --{group}.* options of {class_path} ===")
        with contextlib.suppress(SystemExit):
            build_cli([*plain, f"--{group}.help", class_path])


def selected_class(args: list[str], group: str) -> str:
    """The class path that ``--model``/``--data`` (or the last config setting it) selects."""
    chosen = None
    for path in [*map(str, DEFAULT_CONFIGS), *config_files(resolve_config_args(args))]:
        with contextlib.suppress(OSError, yaml.YAMLError, AttributeError):
            section = (yaml.safe_load(Path(path).read_text()) or {}).get(group) or {}
            chosen = section.get("class_path", chosen)
    own = own_images_args(resolve_config_args(args))
    for name in (f"--{group}", f"--{group}.class_path"):
        chosen = option_value(own, name) or chosen
    return chosen


def main(args: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if args is None else args)

    def command() -> int:
        if "-h" in args or "--help" in args:
            print_help(args)
            return 0
        results = fit_and_test(args)
        print(format_run_table(results) if results.get("tested", True) else format_normal_only(results))
        return 0

    return run_command(command, on_interrupt="no results were written")
