"""One optimiser step and one evaluation pass, with the per-step seeds that make runs repeat."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.device import Runtime
from retrieval.training.augment import Augment
from retrieval.training.data import ImageSource


def step_seed(seed: int, epoch: int, step: int) -> int:
    # Every (epoch, step) gets its own stream: a resumed run draws exactly the same crops.
    return ((seed * 1_000_003 + epoch) * 1_000_033 + step) % (2**63)


class StepRunner:
    """One optimiser step: augment, forward under autocast, backward, clip, step, schedule.

    Shared by `train` and by the per-architecture test, so both exercise the same code.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        runtime: Runtime,
        augment: Augment,
        label_smoothing: float = 0.0,
        grad_clip: float | None = None,
        compile: bool = False,
        tta: bool = False,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.tta = tta
        self.runtime, self.augment = runtime, augment
        self.grad_clip = grad_clip
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.scaler = torch.amp.GradScaler(
            runtime.device.type, enabled=runtime.autocast_dtype == torch.float16
        )
        self.forward: Callable[[torch.Tensor], torch.Tensor] = torch.compile(model) if compile else model

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (summed loss, number correct) as 0-d tensors, left on the device (no sync)."""
        inputs = self.augment.train(x, gen)
        with self.runtime.autocast():
            logits = self.forward(inputs)
            loss = self.loss_fn(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        with torch.no_grad():
            correct = (logits.argmax(1) == y).sum()
        return loss.detach() * len(y), correct

    @torch.no_grad()
    def evaluate(
        self, source: ImageSource, batch_size: int, num_classes: int
    ) -> tuple[float, float, np.ndarray]:
        """(mean loss, accuracy, confusion matrix [true, predicted]) over a whole source."""
        self.model.eval()
        dev = self.runtime.device
        loss_sum = torch.zeros((), device=dev)
        confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=dev)
        order = torch.arange(len(source))
        try:
            for x, y in source.batches(order, batch_size):
                inputs = self.augment.eval(x)
                with self.runtime.autocast():
                    logits = self.forward(inputs).float()
                    if self.tta:  # the mirror is as likely as the original under flip training
                        logits = (logits + self.forward(inputs.flip(-1)).float()) / 2
                loss_sum += F.cross_entropy(logits, y, reduction="sum")
                confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes**2)
        finally:
            self.model.train()
        conf = confusion.view(num_classes, num_classes).cpu().numpy()
        n = max(1, int(conf.sum()))
        return float(loss_sum) / n, float(np.trace(conf)) / n, conf
