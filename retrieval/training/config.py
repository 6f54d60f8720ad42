"""Training settings: `TrainConfig` and its checks, and `with_recipe`, which fills in the defaults."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from retrieval.backbones import get_spec
from retrieval.config import known_keys
from retrieval.errors import RetrieveError

AUGMENTS = ("auto", "crop", "rrc", "none")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle")
# What a None field becomes when the architecture's recipe (BackboneSpec.recipe) does not set it.
GENERAL_DEFAULTS: dict[str, Any] = {
    "optimizer": "sgd",
    "epochs": 30,
    "batch_size": 128,
    "schedule": "cosine",
    "warmup_epochs": 1.0,
    "label_smoothing": 0.1,
    "tta": False,
    "norm_bias_lr_scale": 1.0,
    "crop_pad": None,  # stays None: a 1/8 of the training side, known once the size is
}
# Fields added after runs were first saved: what those runs did (resume must rebuild the same optimiser).
LEGACY_DEFAULTS: dict[str, Any] = {"norm_bias_lr_scale": 1.0, "optimizer": "sgd"}
_GENERAL_LR = {"sgd": 0.1, "adamw": 2e-3}  # peak rate per 128 images
_GENERAL_WD = {"sgd": 5e-4, "adamw": 0.05}


@dataclass(frozen=True)
class TrainConfig:
    """Settings of `retrieve train`; every CLI flag maps onto one field."""

    data: Path | None  # labelled folder: <class>/*, or train/<class> + val|test/<class>; None with resume
    out: Path | None  # run directory (config, metrics, checkpoints, report); None with resume
    arch: str = "resnet18"  # registry name (see `retrieve backbones`)
    pretrained: str | None = None  # "imagenet" fine-tunes from torchvision weights; None = from scratch
    image_size: int | None = None  # training side in px; None = the architecture's (or weights') default
    channels: int | None = None  # 1 or 3; None = 1 when every image is greyscale, else 3
    # None in the fields below = the architecture's recipe (`BackboneSpec.recipe`), else GENERAL_DEFAULTS;
    # `with_recipe` fills them in, and config.json records the filled-in values.
    epochs: int | None = None  # 30
    batch_size: int | None = None  # 128
    optimizer: str | None = None  # "sgd" (momentum 0.9, Nesterov) or "adamw"; None = the recipe's, else sgd
    lr: float | None = None  # peak rate; 0.1 (sgd) / 2e-3 (adamw) per 128 images, /10 pretrained
    weight_decay: float | None = None  # 5e-4 (sgd) / 0.05 (adamw); never applied to norms or biases
    schedule: str | None = None  # "cosine" or "onecycle" (linear up, linear down), after a linear warm-up
    warmup_epochs: float | None = None  # 1.0; linear warm-up length (capped at a third of the run)
    label_smoothing: float | None = None  # 0.1
    grad_clip: float | None = None  # max global gradient norm; None = no clipping
    norm_bias_lr_scale: float | None = None  # 1.0; learning-rate multiple for the shifts of norm layers
    augment: str = "auto"  # "crop" (reflect-pad + random crop), "rrc" (random resized crop), "none"; auto:
    # crop up to 64 px (small images have no room to zoom), rrc above
    flip: bool = True  # random horizontal flips (turn off for digits and text)
    crop_pad: int | None = None  # crop augmentation: largest shift in px; None = size // 8 (4 px at 32)
    tta: bool | None = None  # False; validate on the mean logits of each image and its mirror (needs flip)
    val_fraction: float = 0.1  # held-out share per class when the folder has no val/test split
    seed: int = 0  # seeds the split, init, shuffling and augmentation: same seed, same run on one machine
    deterministic: bool = (
        False  # also force deterministic GPU kernels (slower); CPU runs are already repeatable
    )
    device: str = "auto"  # auto = CUDA > MPS > CPU
    dtype: str = "auto"  # autocast dtype; auto = bf16 where the hardware does it natively (incl. this CPU)
    compile: bool = False  # torch.compile the model (pays off for long GPU runs)
    workers: int | None = None  # decode threads / DataLoader processes; None = CPU count (max 8)
    cache_mb: int | None = None  # memory budget for decoded images; None = a quarter of available RAM;
    # over budget, images stream from disk through a DataLoader instead
    stop_after_epochs: int | None = None  # stop (resumably) after this many epochs of the schedule
    resume: Path | None = None  # a run directory (or its last.pt) to continue; other fields come from it
    overwrite: bool = False  # allow `out` to hold a previous run (its files are replaced)

    def __post_init__(self) -> None:
        if self.resume is None and (self.data is None or self.out is None):
            raise RetrieveError("Give a data folder and an output run directory, or «resume» RUN_DIR.")
        if self.augment not in AUGMENTS:
            raise RetrieveError(
                f"Unknown augmentation {self.augment!r}; choose one of {', '.join(AUGMENTS)}."
            )
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise RetrieveError(
                f"Unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}."
            )
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise RetrieveError(f"Unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}.")
        if self.pretrained not in (None, "imagenet"):
            raise RetrieveError(f"«pretrained» takes 'imagenet' (got {self.pretrained!r}).")
        if self.channels not in (None, 1, 3):
            raise RetrieveError("«channels» must be 1 or 3.")
        if (self.epochs is not None and self.epochs < 1) or (
            self.batch_size is not None and self.batch_size < 1
        ):
            raise RetrieveError("epochs and batch size must be at least 1.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise RetrieveError("«val_fraction» must be in [0, 1).")
        if self.image_size is not None and self.image_size < 8:
            raise RetrieveError("«image_size» must be at least 8.")
        if self.label_smoothing is not None and not 0.0 <= self.label_smoothing < 1.0:
            raise RetrieveError("«label_smoothing» must be in [0, 1).")
        if self.crop_pad is not None and self.crop_pad < 0:
            raise RetrieveError("«crop_pad» must be 0 or more pixels.")
        if self.tta and not self.flip:
            raise RetrieveError("«tta» averages each image with its mirror; it needs «flip».")
        if self.norm_bias_lr_scale is not None and self.norm_bias_lr_scale <= 0:
            raise RetrieveError("«norm_bias_lr_scale» must be above 0.")
        if self.stop_after_epochs is not None and self.stop_after_epochs < 1:
            raise RetrieveError("«stop_after_epochs» must be at least 1.")
        # NaN passes every `<` test, so each bound is written as what must hold.
        checks = [
            ("«lr»", self.lr, lambda v: 0 < v < math.inf, "a positive finite number"),
            (
                "«weight_decay»",
                self.weight_decay,
                lambda v: 0 <= v < math.inf,
                "0 or a positive finite number",
            ),
            ("«warmup_epochs»", self.warmup_epochs, lambda v: 0 <= v < math.inf, "0 or more epochs"),
            ("«grad_clip»", self.grad_clip, lambda v: 0 < v < math.inf, "a positive finite norm"),
        ]
        for flag, value, ok, what in checks:
            if value is not None and not ok(value):
                raise RetrieveError(f"{flag} must be {what}, not {value}.")
        if not 0 <= self.seed < 2**63:
            raise RetrieveError(f"«seed» must be in [0, 2**63), not {self.seed}.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (paths as strings): written to config.json and into every checkpoint."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known_keys(cls, d)
        # A run saved before a field existed ran with that field's old behaviour, not today's recipe.
        d = {**LEGACY_DEFAULTS, **d}
        paths = {"data", "out", "resume"}
        return cls(**{k: (Path(v) if k in paths and v is not None else v) for k, v in d.items()})


def with_recipe(config: TrainConfig) -> TrainConfig:
    """`config` with every None training default filled in: from the architecture's recipe where it
    has one, else GENERAL_DEFAULTS. Fields the user set are kept; applying it twice changes nothing."""
    spec = get_spec(config.arch)
    finetune = dict(spec.finetune_recipe) if config.pretrained else {}
    recipe = dict(spec.recipe) | finetune
    fill = {k: recipe.get(k, v) for k, v in GENERAL_DEFAULTS.items() if getattr(config, k) is None}
    if config.tta is None and not config.flip:
        fill["tta"] = False  # the recipe's flip TTA presumes flip training; --no-flip turns it off
    c = replace(config, **fill)
    assert c.batch_size is not None
    same_optimizer = c.optimizer == recipe.get("optimizer", "sgd")
    lr, wd = c.lr, c.weight_decay
    if lr is None:
        if same_optimizer and "lr" in recipe:
            lr = recipe["lr"] * c.batch_size / recipe.get("batch_size", 128)
        else:
            lr = _GENERAL_LR[c.optimizer] * c.batch_size / 128  # linear scaling rule (Goyal et al.)
        if c.pretrained and not (same_optimizer and "lr" in finetune):
            lr /= 10  # fine-tuning: keep the ImageNet features, adapt them gently
    if wd is None:
        wd = (
            recipe["weight_decay"]
            if same_optimizer and "weight_decay" in recipe
            else _GENERAL_WD[c.optimizer]
        )
    return replace(c, lr=lr, weight_decay=wd)
