"""The command line: LightningCLI that fits and then tests one (category, fold).

``python train.py`` with no arguments runs the embedded offline demo
(``configs/default.yaml``). Every option can be set in a YAML file
(``--config FILE``) or with dotted overrides (``--model.backbone resnet18``).
Runs are written to ``<trainer.default_root_dir>/<method>/<name>/<category>/fold_<k>/``.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from pytorch_lightning import Trainer
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import TensorBoardLogger

from anomaly.data.datamodule import AnomalyDataModule
from anomaly.errors import UserError
from anomaly.evaluation.report import format_run_table
from anomaly.evaluation.results import remove_stale_results
from anomaly.methods.base import AnomalyMethod

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


def run_dir_parts(model: AnomalyMethod, data: AnomalyDataModule) -> tuple[str, str]:
    """(``<method>/<name>/<category>``, ``fold_<k>``) of a run, relative to the root dir."""
    fold = "fold_all" if data.fold is None else f"fold_{data.fold}"
    name = model.run_name() + ("_augment" if data.augment else "")
    return f"{model.method_name}/{name}/{data.category}", fold


class AnomalyCLI(LightningCLI):
    """LightningCLI whose logger writes into the run's own directory."""

    def instantiate_trainer(self, **kwargs) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        root = config.get("default_root_dir") or "runs"
        name, version = run_dir_parts(self.model, self.datamodule)
        if config.get("logger", True) is not False:
            kwargs["logger"] = TensorBoardLogger(
                save_dir=root, name=name, version=version, default_hp_metric=False
            )
        kwargs["default_root_dir"] = root
        return super().instantiate_trainer(**kwargs)


def quiet_lightning() -> None:
    """Keep the console to what a user needs: progress and the result table."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (
        ".*does not have many workers.*",
        ".*`configure_optimizers` returned `None`.*",
        ".*Checkpoint directory.*exists and is not empty.*",
        ".*smaller than the logging interval.*",
        ".*GPU available but not used.*",
        ".*is an invalid version and will not be supported.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def build_cli(args: list[str] | None = None) -> AnomalyCLI:
    return AnomalyCLI(
        model_class=AnomalyMethod,
        datamodule_class=AnomalyDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=args,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_config_files": [str(DEFAULT_CONFIG)], "parser_mode": "omegaconf"},
        auto_configure_optimizers=False,
    )


def fit_and_test(args: list[str] | None = None) -> dict:
    """Parse the arguments, fit, test, and return the run's results."""
    quiet_lightning()
    cli = build_cli(args)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    run_dir = Path(trainer.log_dir or trainer.default_root_dir)
    if trainer.is_global_zero:
        remove_stale_results(run_dir)
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, verbose=False)
    results = dict(model.test_summary or {})
    results["run_dir"] = str(run_dir)
    return results


def user_message(error: UserError) -> str:
    """The one-line message, also when a loader worker re-raised it with its traceback."""
    text = str(error).strip()
    if "Traceback" in text:
        text = text.splitlines()[-1].split("UserError: ", 1)[-1]
    return text.splitlines()[0] if text else type(error).__name__


def find_user_error(error: BaseException) -> UserError | None:
    """The UserError behind ``error`` (argument parsing and loaders wrap it)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def main(args: list[str] | None = None) -> int:
    try:
        results = fit_and_test(args)
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None:
            raise
        print(f"error: {user_message(user_error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no results were written", file=sys.stderr)
        return 130
    print(format_run_table(results))
    return 0
