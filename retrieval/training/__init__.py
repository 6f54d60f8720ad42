"""Train a registry architecture on labelled folders: `train(TrainConfig) -> TrainResult`, resumable."""

from retrieval.training.augment import Augment
from retrieval.training.config import GENERAL_DEFAULTS, TrainConfig, with_recipe
from retrieval.training.data import ImageSource, Split, decode_to_memory, discover
from retrieval.training.loop import train
from retrieval.training.model import build_model, trainable_archs
from retrieval.training.optim import make_optimizer, make_scheduler
from retrieval.training.report import EpochStats, TrainReporter, TrainResult
from retrieval.training.step import StepRunner

__all__ = [
    "GENERAL_DEFAULTS",
    "Augment",
    "EpochStats",
    "ImageSource",
    "Split",
    "StepRunner",
    "TrainConfig",
    "TrainReporter",
    "TrainResult",
    "build_model",
    "decode_to_memory",
    "discover",
    "make_optimizer",
    "make_scheduler",
    "train",
    "trainable_archs",
    "with_recipe",
]
