"""Run under torchrun by test_training: train a few steps, save this rank's weights."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from transformer.config import load_config
from transformer.training import Trainer

if __name__ == "__main__":
    config, out, *overrides = sys.argv[1:]
    trainer = Trainer(load_config(config, overrides), resume=False)
    trainer.train()
    torch.save(trainer.model.state_dict(), Path(out) / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()
