"""Training: the loop, the optimizer and schedule, checkpoints.

``python -m llmcore.train --preset NAME`` trains a named preset from the command line.
"""

from llmcore.train.checkpoint import (CheckpointError, load_checkpoint, read_checkpoint,
                                      save_checkpoint)
from llmcore.train.loop import (PRECISIONS, History, Interrupted, TrainConfig,
                                default_loss, evaluate, precision_context, train)
from llmcore.train.optim import make_optimizer, make_scheduler, warmup_cosine

__all__ = ["CheckpointError", "History", "Interrupted", "PRECISIONS", "TrainConfig",
           "default_loss", "evaluate", "load_checkpoint", "make_optimizer",
           "make_scheduler", "precision_context", "read_checkpoint", "save_checkpoint",
           "train", "warmup_cosine"]
