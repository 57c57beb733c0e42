"""The command line: LightningCLI that fits and then tests one (category, fold).

``python train.py`` with no arguments runs the embedded offline demo
(``configs/default.yaml``). Every option can be set in a YAML file
(``--config FILE``) or with dotted overrides (``--model.backbone resnet18``).
Runs are written to ``<trainer.default_root_dir>/<method>/<name>/<category>/fold_<k>/``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning import Trainer
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import TensorBoardLogger

from anomaly.arguments import check_config_file, check_expanded_values, config_files, one_line_parse_error
from anomaly.console import run_command
from anomaly.data.datamodule import AnomalyDataModule
from anomaly.detector.run import remove_stale_detector, save_run_detector
from anomaly.errors import ArgumentsError
from anomaly.evaluation.report import format_run_table
from anomaly.evaluation.results import remove_stale_results
from anomaly.methods.base import AnomalyMethod
from anomaly.methods.distributed import resolve_strategy, statistics_replacement
from anomaly.runfolder import hold_run_folder, remove_empty_folders

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


def run_dir_parts(
    model: AnomalyMethod, data: AnomalyDataModule, epochs: int | None, precision: object = None
) -> tuple[str, str]:
    """(``<method>/<name>/<category>``, ``fold_<k>``) of a run, relative to the root dir.

    A resolution other than the backbone's adds ``_<size>px``, a precision other than
    float32 ``_<precision>``. Augmented runs end in ``_augment``; for methods that
    stream every augmented pass into their fit (Gaussian, oc-SVM) the number of passes
    follows (``_augment100``), and a seed other than 0 ``_seed<k>``.
    """
    fold = "fold_all" if data.fold is None else f"fold_{data.fold}"
    name = model.run_name()
    if data.image_size is not None and data.image_size != getattr(model, "input_size", None):
        name += f"_{data.image_size}px"  # not the backbone's native resolution
    if precision is not None and str(precision) not in ("32", "32-true"):
        name += f"_{precision}"
    if data.augment:
        counted = model.epochs_are_samples and epochs is not None and epochs > 0
        name += f"_augment{epochs}" if counted else "_augment"
        name += f"_seed{data.seed}" if data.seed else ""
    return f"{model.method_name}/{name}/{data.category}", fold


class AnomalyCLI(LightningCLI):
    """LightningCLI whose logger writes into the run's own directory."""

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


def build_cli(args: list[str] | None = None) -> AnomalyCLI:
    """The CLI, parsed; an option the parser rejects raises :class:`ArgumentsError` (one line)."""
    check_expanded_values(list(sys.argv[1:] if args is None else args))
    for path in config_files(list(sys.argv[1:] if args is None else args)):
        if Path(path).is_file():  # a missing file is the parser's own message
            check_config_file(path)
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
                "default_config_files": [str(DEFAULT_CONFIG)],
                "parser_mode": "omegaconf",
                "exit_on_error": False,
            },
            auto_configure_optimizers=False,
        )
    except argparse.ArgumentError as error:
        raise ArgumentsError(one_line_parse_error(str(error))) from None


def remove_run_outputs(run_dir: Path) -> None:
    """An earlier (or failed) run's results, scores, figures, events and detector."""
    remove_stale_results(run_dir)
    remove_stale_detector(run_dir)


def remove_failed_run(run_dir: Path, root: Path) -> None:
    """A failed run leaves nothing that looks like a result: its files go, and its folders if emptied."""
    remove_run_outputs(run_dir)
    for name in ("config.yaml", "hparams.yaml"):
        (run_dir / name).unlink(missing_ok=True)
    remove_empty_folders(run_dir, root)


def fit_and_test(args: list[str] | None = None) -> dict:
    """Parse the arguments, fit, test, and return the run's results."""
    quiet_lightning()
    cli = build_cli(args)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    model.report_figures = bool(cli.config.get("figures", True))
    run_dir, root = Path(trainer.log_dir or trainer.default_root_dir), Path(trainer.default_root_dir)
    with hold_run_folder(run_dir, root, data.dataset, enabled=trainer.is_global_zero):
        if trainer.is_global_zero:
            remove_run_outputs(run_dir)
        try:
            trainer.fit(model, datamodule=data)
            trainer.test(model, datamodule=data, verbose=False)
            if trainer.is_global_zero:
                save_run_detector(model, data.image_size, run_dir)  # detector.safetensors + detector.json
        except BaseException:
            if trainer.is_global_zero:
                remove_failed_run(run_dir, root)
            raise
    results = dict(model.test_summary or {})
    results["run_dir"] = str(run_dir)
    return results


def main(args: list[str] | None = None) -> int:
    def command() -> int:
        print(format_run_table(fit_and_test(args)))
        return 0

    return run_command(command, on_interrupt="no results were written")
