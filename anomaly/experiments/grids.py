"""The run grid behind each of the paper's tables (categories × folds × settings).

A :class:`Setting` is one column of a table: the training arguments of its runs
(beyond data root, category and fold), the score column it reads, and the
paper's column to print beside it. Settings with the same arguments share
their runs: Table I's three columns read three score types of the same runs,
and Table II's EfficientNet-B4 and Table III's "No compression" columns are
Table I's runs again (one run gives every level and every score type).
Every run resizes images as the paper's code does (:data:`PAPER_RESIZE`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from anomaly.cli import CONFIG_DIR
from anomaly.errors import UserError

PAPER_BACKBONE = "efficientnet-b4"
FEATURE_METHODS = ("gaussian", "ocsvm")  # methods on pooled features of a frozen backbone
AUGMENTED = ("--data.augment", "true", "--trainer.max_epochs", "100")  # 100 augmented passes (Section IV-B)
#: The paper's code resizes with albumentations' Resize: OpenCV bilinear, no anti-aliasing.
PAPER_RESIZE = ("--data.resize", "linear")


#: The paper's method (``anomaly fit`` without a config fits the recommended detector instead).
PAPER_CONFIG = ("--config", str(CONFIG_DIR / "paper.yaml"))


def gaussian_args(backbone: str, reduction: str = "none", threshold: float | None = None) -> tuple[str, ...]:
    args: tuple[str, ...] = (*PAPER_CONFIG, "--model.backbone", backbone)
    if reduction != "none":
        args += ("--model.reduction", reduction, "--model.variance_threshold", f"{threshold:g}")
    return args + PAPER_RESIZE


def method_args(method: str, backbone: str | None = None) -> tuple[str, ...]:
    """A baseline's shipped config (``configs/<method>.yaml``) and, where it has one, its backbone."""
    args: tuple[str, ...] = ("--config", str(CONFIG_DIR / f"{method}.yaml"))
    return args + (("--model.backbone", backbone) if backbone else ()) + PAPER_RESIZE


@dataclass(frozen=True)
class Setting:
    """One table column: how its runs are trained and which score it reads."""

    label: str
    method: str
    backbone: str | None
    args: tuple[str, ...]
    score_type: str | None = None  # None: the run's primary score
    paper_column: str | None = None
    architecture: str = ""  # Table V's "Architecture" column

    @property
    def uses_feature_cache(self) -> bool:
        """Whether its runs read pooled backbone features (and so can share the feature cache)."""
        return self.method in FEATURE_METHODS


@dataclass(frozen=True)
class TableSpec:
    """A paper table: its settings and how its printout is laid out."""

    name: str
    title: str
    layout: str  # "levels", "working_point", "methods" or "categories"
    settings: tuple[Setting, ...]
    single_backbone: bool = False  # --backbone replaces the backbone instead of choosing columns
    level: str = "7"  # the level of the working-point table
    notes: tuple[str, ...] = field(default_factory=tuple)

    def with_backbones(self, backbones: Sequence[str] | None) -> TableSpec:
        """The table for other backbones: replaced (single-backbone tables) or chosen columns."""
        if not backbones:
            return self
        if self.single_backbone:
            if len(backbones) != 1:
                raise UserError(
                    f"{self.name} has one backbone: give --backbone once, e.g. --backbone resnet18"
                )
            (new,) = backbones
            settings = tuple(
                replace(s, backbone=new, args=tuple(new if a == s.backbone else a for a in s.args))
                for s in self.settings
            )
            note = f"the (paper) columns are the paper's {PAPER_BACKBONE} values"
            title = self.title.replace(PAPER_BACKBONE, new)
            return replace(self, settings=settings, title=title, notes=(*self.notes, note))
        chosen = tuple(s for s in self.settings if s.backbone in backbones)
        if not chosen:
            names = sorted({s.backbone for s in self.settings if s.backbone})
            raise UserError(
                f"{self.name} has no column for {', '.join(backbones)}; its backbones: {', '.join(names)}"
            )
        return replace(self, settings=chosen)


SCORE_COLUMNS = (("L2", "l2"), ("SED", "sed"), ("Mahalanobis", "mahalanobis"))
REDUCTIONS = (
    ("No compression", "none", None),
    ("PCA 99%", "pca", 0.99),
    ("PCA 95%", "pca", 0.95),
    ("NPCA 1%", "npca", 0.99),
    ("NPCA 0.1%", "npca", 0.999),
    ("NPCA 0.01%", "npca", 0.9999),
)


def _level_setting(label: str, backbone: str, args: tuple[str, ...], score: str = "mahalanobis") -> Setting:
    return Setting(label, "gaussian", backbone, args, score, paper_column=label)


def table1() -> TableSpec:
    b = PAPER_BACKBONE
    return TableSpec(
        "table1",
        f"Table I: image AUROC (± SEM, %) per level of {b} for the three normal-distribution scores",
        "levels",
        tuple(_level_setting(label, b, gaussian_args(b), score) for label, score in SCORE_COLUMNS),
        single_backbone=True,
    )


def table2() -> TableSpec:
    settings = tuple(
        _level_setting(f"EfficientNet-B{i}", f"efficientnet-b{i}", gaussian_args(f"efficientnet-b{i}"))
        for i in range(8)
    )
    return TableSpec(
        "table2",
        "Table II: Mahalanobis AUROC (± SEM, %) per level of EfficientNet-B0 … B7",
        "levels",
        settings,
    )


def table3() -> TableSpec:
    b = PAPER_BACKBONE
    settings = tuple(_level_setting(label, b, gaussian_args(b, red, t)) for label, red, t in REDUCTIONS)
    return TableSpec(
        "table3",
        f"Table III: Mahalanobis AUROC (± SEM, %) per level of {b} with PCA / negated PCA (NPCA) reduction",
        "levels",
        settings,
        single_backbone=True,
    )


def table4() -> TableSpec:
    def wp(label: str, backbone: str, reduction: str = "none", t: float | None = None) -> Setting:
        args = (*gaussian_args(backbone, reduction, t), "--model.levels", "[7]", *AUGMENTED)
        return Setting(label, "gaussian", backbone, args, "mahalanobis", paper_column=label)

    return TableSpec(
        "table4",
        "Table IV: target FPR (eq. 8, n·σ) and achieved test FPR / TPR (%) at level 7, augmented fit",
        "working_point",
        (
            wp("EN-B0 PCA 99%", "efficientnet-b0", "pca", 0.99),
            wp("EN-B0 All Features", "efficientnet-b0"),
            wp("EN-B4 NPCA 1%", "efficientnet-b4", "npca", 0.99),
            wp("EN-B4 All Features", "efficientnet-b4"),
        ),
    )


def method_settings() -> tuple[Setting, ...]:
    """The compared methods of Tables V and VIII (each labelled as Table VIII's column)."""

    def classifier(label: str, backbone: str, arch: str) -> Setting:
        args = method_args("classifier", backbone)
        if backbone.startswith("efficientnet"):
            args += ("--data.batch_size", "16")  # the paper: 64 for ResNet, 16 for EfficientNet
        return Setting(label, "classifier", backbone, args, None, label, arch)

    def ocsvm(label: str, backbone: str, arch: str) -> Setting:
        return Setting(label, "ocsvm", backbone, method_args("ocsvm", backbone), None, label, arch)

    b4 = PAPER_BACKBONE

    def mahalanobis(label: str, args: tuple[str, ...]) -> Setting:
        return Setting(label, "gaussian", b4, (*args, *AUGMENTED), "mahalanobis", label, "EfficientNet-B4")

    autoencoder = method_args("autoencoder")
    return (
        Setting("MSE AE Map-Mean (RN-18)", "autoencoder", "resnet18", autoencoder, "map_mean",
                "MSE AE Map-Mean (RN-18)", "ResNet-18"),
        Setting("MSE AE CCA (RN-18)", "autoencoder", "resnet18", autoencoder, "cca", "MSE AE CCA (RN-18)",
                "ResNet-18"),
        classifier("Fine-tune RN-18", "resnet18", "ResNet-18"),
        classifier("Fine-tune RN-34", "resnet34", "ResNet-34"),
        classifier("Fine-tune EN-B0", "efficientnet-b0", "EfficientNet-B0"),
        classifier("Fine-tune EN-B4", "efficientnet-b4", "EfficientNet-B4"),
        mahalanobis("Mahalanobis All Features (EN-B4)", gaussian_args(b4)),
        mahalanobis("Mahalanobis NPCA 1% (EN-B4)", gaussian_args(b4, "npca", 0.99)),
        ocsvm("oc-SVM EN-B0", "efficientnet-b0", "EfficientNet-B0"),
        ocsvm("oc-SVM EN-B4", "efficientnet-b4", "EfficientNet-B4"),
    )  # fmt: skip


def table5() -> TableSpec:
    return TableSpec(
        "table5",
        "Table V: image AUROC (± SEM, %) of the compared methods, summed over levels",
        "methods",
        method_settings(),
        notes=(
            "literature rows (GeoTrans, GANomaly, ITAE, SPADE) are the paper's values; they are not rerun",
        ),
    )


def table7() -> TableSpec:
    settings = tuple(
        _level_setting(f"ResNet-{depth}", f"resnet{depth}", gaussian_args(f"resnet{depth}"))
        for depth in (18, 34, 50)
    )
    return TableSpec(
        "table7", "Table VII: Mahalanobis AUROC (± SEM, %) per level of ResNet-18/34/50", "levels", settings
    )


def table8() -> TableSpec:
    return TableSpec(
        "table8", "Table VIII: image AUROC (%) per MVTec AD category of the compared methods", "categories",
        method_settings(),
    )  # fmt: skip


TABLES = {spec.name: spec for spec in (table1(), table2(), table3(), table4(), table5(), table7(), table8())}
