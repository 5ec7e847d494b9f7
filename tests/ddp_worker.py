"""Run under torchrun by the tests: train, then save this rank's weights and step.

The worker first writes its pid to ``OUT/pid<rank>`` (so a test can signal one
rank). ``FAULT_INF_GRAD=RANK:STEP`` makes rank RANK's gradient of one weight
infinite once, in update STEP. ``FORBID_STORE_BUILD=1`` makes building a corpus
store an error (the store must already exist: no rank tokenizes).
"""

import os
import sys
from pathlib import Path

import torch

from transformer.config import load_config
from transformer.training import Trainer

if __name__ == "__main__":
    config, out, *overrides = sys.argv[1:]
    out = Path(out)
    rank = int(os.environ["RANK"])
    (out / f"pid{rank}").write_text(str(os.getpid()))
    if os.environ.get("FORBID_STORE_BUILD"):
        from transformer.data import store

        def forbidden(*args, **kwargs):
            raise AssertionError(f"rank {rank} tokenized the training corpus")

        store.build_store = forbidden
    trainer = Trainer(load_config(config, overrides))
    fault = os.environ.get("FAULT_INF_GRAD")
    if fault:
        bad_rank, bad_step = map(int, fault.split(":"))
        fired = []

        def infinite(grad: torch.Tensor) -> torch.Tensor:
            if trainer.state.step + 1 == bad_step and not fired:
                fired.append(True)
                return torch.full_like(grad, float("inf"))
            return grad

        if rank == bad_rank:
            trainer.model.decoder[0].ffn.fc1.weight.register_hook(infinite)
    trainer.train()
    state = {"model": trainer.model.state_dict(), "step": trainer.state.step}
    torch.save(state, out / f"rank{rank}.pt")
    trainer.dist.close()
