"""Training: the loop and its parts, one module each.

``build`` makes the device, tokenizer, model and batches; ``optim`` the optimizer
and schedule; ``loss`` the objective; ``state`` the run's mutable state and data
position; ``distributed`` the ranks; ``checkpointing`` the writes; ``validation``
the scores; ``ema`` the moving average of the weights; ``finetune`` the start from
another run's checkpoint; ``progress`` what is shown and logged; ``loop`` ties them
together.
"""

from transformer.precision import autocast
from transformer.training.loop import Trainer, train
from transformer.training.loss import label_smoothed_loss
from transformer.training.optim import lr_factor
from transformer.training.state import StepResult, TrainingError, TrainState

__all__ = [
    "StepResult",
    "TrainState",
    "Trainer",
    "TrainingError",
    "autocast",
    "label_smoothed_loss",
    "lr_factor",
    "train",
]
