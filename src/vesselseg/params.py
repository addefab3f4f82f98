"""The schema of ``params.yaml`` and the one function that loads it.

Every stage calls :func:`load_params` before doing any work, so a typo or an
out-of-range value stops the pipeline with one line naming the key, instead of a
traceback an hour later.  Models are ``extra="forbid"``: an unknown key is an error,
not a silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vesselseg.errors import ParamsError
from vesselseg.registry import FAMILIES

DATASETS = (
    "synthetic",
    "synthetic-fundus",
    "drive",
    "octa500",
    "hrf",
    "chase_db1",
    "stare",
    "retina_kaggle",
    "lgg_mri",
    "folder",
)


class _Section(BaseModel):
    # Field defaults mirror the shipped params.yaml (tests/test_params.py fails on any
    # drift): they exist so code and tests can build a section without a file, while
    # params.yaml stays the one place a user reads and changes a setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticParams(_Section):
    n_subjects: int = Field(16, ge=3)
    n_bscans: int = Field(128, ge=16)
    depth: int = Field(160, ge=16)
    width: int = Field(128, ge=16)
    slab: tuple[int, int] = (60, 100)

    @model_validator(mode="after")
    def _slab_inside(self) -> SyntheticParams:
        lo, hi = self.slab
        if not 0 <= lo < hi <= self.depth:
            raise ValueError(f"slab {list(self.slab)} must satisfy 0 <= start < stop <= depth={self.depth}")
        return self


class SyntheticFundusParams(_Section):
    n_images: int = Field(16, ge=3)
    size: int = Field(256, ge=32)


class Octa500Params(_Section):
    subset: Literal["3M", "6M"] = "3M"
    label: str = "GT_LargeVessel"
    projection: str = "OCTA(ILM_OPL)"


class FolderParams(_Section):
    images: str | None = None
    labels: str | None = None
    fov: str | None = None


class DataParams(_Section):
    dataset: Literal[DATASETS] = "synthetic"  # type: ignore[valid-type]
    source: str | None = None
    seed: int = 0
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    synthetic: SyntheticParams = SyntheticParams()
    synthetic_fundus: SyntheticFundusParams = SyntheticFundusParams()
    octa500: Octa500Params = Octa500Params()
    folder: FolderParams = FolderParams()

    @model_validator(mode="after")
    def _fractions(self) -> DataParams:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave images to train on (sum < 1)")
        return self


class PrepareParams(_Section):
    projection: Literal["mean", "max", "min"] = "mean"
    slab: tuple[int, int] | None = (60, 100)
    channel: Literal["green", "grey", "rgb"] = "green"
    equalize: Literal["none", "global", "clahe"] = "clahe"
    clahe_clip: float = Field(2.0, gt=0)
    clahe_tile: int = Field(8, ge=1)
    gamma: float = Field(1.0, gt=0)
    scale: float = Field(1.0, gt=0.0, le=4.0)
    fov_diameter: int | None = Field(None, ge=16)
    volumes: bool = False
    volume_depth: int = Field(64, ge=2)

    @field_validator("slab")
    @classmethod
    def _slab_order(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not 0 <= v[0] < v[1]:
            raise ValueError(f"slab {list(v)} must satisfy 0 <= start < stop")
        return v

    @model_validator(mode="after")
    def _one_resolution_rule(self) -> PrepareParams:
        # two ways to set the resolution would fight: the FOV rule already picks the scale
        if self.fov_diameter is not None and self.scale != 1.0:
            raise ValueError(
                "prepare.fov_diameter and prepare.scale are exclusive: set prepare.scale to 1.0 "
                "or prepare.fov_diameter to null"
            )
        return self


class PatchesParams(_Section):
    size: int = Field(48, ge=8)
    per_image: int = Field(150, ge=1)
    sampling: Literal["uniform", "foreground"] = "foreground"
    foreground_fraction: float = Field(0.5, ge=0.0, le=1.0)
    image_weighting: Literal["uniform", "foreground"] = "uniform"
    val_per_image: int = Field(100, ge=1)
    augment_copies: int = Field(0, ge=0)
    rotate_limit: float = Field(0.0, ge=0.0, le=180.0)
    scale_limit: float = Field(0.0, ge=0.0, lt=1.0)


class KnnParams(_Section):
    k_grid: tuple[int, ...] = (3, 5, 7, 9)
    cv: int = Field(3, ge=2)
    background_keep: float = Field(0.3, gt=0.0, le=1.0)
    near_vessel_px: int = Field(3, ge=0)
    max_pixels: int = Field(50000, ge=100)


class VesselnessParams(_Section):
    sigmas: tuple[float, ...] = (1.5, 3.0)
    black_ridges: bool = True


class IpnParams(_Section):
    channels: int = Field(16, ge=1)
    n_blocks: int = Field(3, ge=1)
    block: int = Field(64, ge=8)


class ResnetPatchParams(_Section):
    width: int = Field(64, ge=4)
    weights: str | None = None


class ModelParams(_Section):
    name: Literal[tuple(FAMILIES)] = "unet"  # type: ignore[valid-type]
    depth: int = Field(3, ge=1, le=7)
    base_channels: int = Field(16, ge=1)
    batch_norm: bool = True
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    upsampling: Literal["bilinear", "transpose"] = "bilinear"
    padding: Literal["same", "valid"] = "same"
    input_norm: bool = False
    stacks: int = Field(1, ge=1, le=4)
    in_channels: int = Field(1, ge=1)
    out_channels: int = Field(1, ge=1, le=2)
    knn: KnnParams = KnnParams()
    vesselness: VesselnessParams = VesselnessParams()
    ipn: IpnParams = IpnParams()
    resnet_patch: ResnetPatchParams = ResnetPatchParams()


class TrainParams(_Section):
    lr: float = Field(1e-3, gt=0)
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(32, ge=1)
    loss: Literal["bce", "dice", "bce+dice", "soft_iou", "ce"] = "bce+dice"
    dice_weight: float = Field(0.5, ge=0.0, le=1.0)
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    scheduler: Literal["none", "step", "onecycle"] = "none"
    step_size: int = Field(20, ge=1)
    gamma: float = Field(0.9, gt=0.0, le=1.0)
    patience: int = Field(4, ge=1)
    select_metric: Literal["dice", "iou"] = "dice"
    val_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    val_window: int | None = Field(None, ge=8)
    val_overlap: float = Field(0.25, ge=0.0, lt=1.0)
    val_weighting: Literal["constant", "gaussian"] = "gaussian"
    flip: bool = True
    rotate90: bool = True
    threads: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    channels_last: bool = True
    max_minutes: float = Field(0.0, ge=0.0)
    ema: float = Field(0.0, ge=0.0, lt=1.0)
    ema_bn_batches: int = Field(32, ge=1)


class PredictParams(_Section):
    window: int | None = Field(1024, ge=8)
    overlap: float = Field(0.125, ge=0.0, lt=1.0)
    weighting: Literal["constant", "gaussian"] = "gaussian"
    batch_size: int = Field(4, ge=1)
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    channels_last: bool = True
    tta: Literal["none", "flips", "d4"] = "none"


class EvaluateParams(_Section):
    n_overlays: int = Field(3, ge=0)
    curve_points: int = Field(201, ge=3)


class TrackingParams(_Section):
    experiment: str = "vesselseg"


class Params(_Section):
    recipe: str = "default"
    seed: int = 0
    data: DataParams = DataParams()
    prepare: PrepareParams = PrepareParams()
    patches: PatchesParams = PatchesParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    predict: PredictParams = PredictParams()
    evaluate: EvaluateParams = EvaluateParams()
    tracking: TrackingParams = TrackingParams()

    @model_validator(mode="after")
    def _cross_section_rules(self) -> Params:
        """The rules that tie ``model`` to ``train`` and ``prepare``: refused here, before any work.

        Each message names both keys.  The facts per family (allowed losses, two
        classes, one input channel, volumes) are declared in the family registry
        (:mod:`vesselseg.families`), so a new family brings its own constraints.
        """
        m, t, prep = self.model, self.train, self.prepare
        fam = FAMILIES[m.name]
        if fam.losses is not None and t.loss not in fam.losses:
            raise ValueError(
                f"train.loss: {t.loss!r} is not supported by model.name {m.name!r} "
                f"(use {' or '.join(map(repr, fam.losses))})"
            )
        if m.out_channels == 2 and not fam.two_class:
            raise ValueError(f"model.out_channels: 2 is not supported by model.name {m.name!r} (set 1)")
        if fam.neural and (t.loss == "ce") != (m.out_channels == 2):
            if t.loss == "ce":
                raise ValueError("train.loss: 'ce' needs model.out_channels: 2 (two classes with softmax)")
            raise ValueError(f"model.out_channels: 2 needs train.loss: 'ce' (got {t.loss!r}, a one-output loss)")
        if m.stacks > 1 and not fam.stackable:
            raise ValueError(f"model.stacks: {m.stacks} stacks U-Nets (a W-Net); model.name {m.name!r} has one (set 1)")
        if m.stacks > 1 and m.padding != "same":
            raise ValueError(
                f"model.stacks: {m.stacks} needs model.padding: same (a 'valid' stage shrinks what it refines)"
            )
        if fam.one_channel and m.in_channels != 1:
            raise ValueError(f"model.in_channels: model.name {m.name!r} reads one-channel inputs (set 1)")
        if fam.one_channel and prep.channel == "rgb":
            raise ValueError(
                f"prepare.channel: 'rgb' gives 3-channel images but model.name {m.name!r} reads "
                "one channel (use green or grey)"
            )
        if fam.needs_volumes and not prep.volumes:
            raise ValueError(f"prepare.volumes: model.name {m.name!r} trains on prepared volumes (set true)")
        if fam.neural and not fam.one_channel and (prep.channel == "rgb") != (m.in_channels == 3):
            if prep.channel == "rgb":
                raise ValueError(
                    f"model.in_channels: prepare.channel 'rgb' gives 3 channels (got {m.in_channels}; set 3)"
                )
            raise ValueError(
                f"model.in_channels: {m.in_channels} needs prepare.channel: rgb ({prep.channel!r} gives 1 channel)"
            )
        return self

    def flat(self) -> dict[str, Any]:
        """Dotted-key view (``train.lr``) as MLflow and DVC show params."""
        return flatten(self.model_dump(mode="json"))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _format_error(path: Path, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (typo?)"
    got = first.get("input")
    got_txt = "" if isinstance(got, dict) or first["type"] == "extra_forbidden" else f" (got {got!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    if not loc:  # a rule across sections names its keys itself
        return f"{path}: {msg}{more}"
    return f"{path}: {loc}: {msg}{got_txt}{more}"


def parse_params(raw: Any, path: Path | str = "params.yaml") -> Params:
    """Validate an already-loaded mapping; errors name the dotted key."""
    path = Path(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(path, err)) from None


def load_params(path: Path | str = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read, validate and freeze the params file.

    ``overrides`` maps dotted keys to values (tests and the CLI use it), applied
    before validation so they are checked like the file itself.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ParamsError(f"{path}:{where}: malformed YAML ({getattr(err, 'problem', err)})") from None
    raw = {} if raw is None else raw
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    return parse_params(raw, path)


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
