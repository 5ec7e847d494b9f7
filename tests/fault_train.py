"""``transformer-train`` with a fault injected (run by the tests, alone or under
torchrun). ``FAULT`` says which, on which rank (0 without torchrun):

- ``worker:RANK:BATCH``: the data worker of rank RANK that collates batch BATCH of
  the first epoch raises ``IndexError``, as a worker reading a cut store did (the
  patch is made before the workers fork, so they inherit it; the main process's
  own collation is left alone);
- ``validation:RANK``: validating on rank RANK raises ``RuntimeError`` (a bug);
- ``save:RANK``: writing a checkpoint on rank RANK fails with ``ENOSPC``.
"""

import errno
import os
import sys

from torch.utils.data import get_worker_info

from transformer.cli.train import train_main

if __name__ == "__main__":
    rank = int(os.environ.get("RANK", "0"))
    kind, bad_rank, *rest = os.environ["FAULT"].split(":")
    if kind == "worker":
        from transformer.data import TrainBatches

        real, seen, bad_batch = TrainBatches.collate, [], int(rest[0])

        def collate(self, ids, epoch=None):
            info = get_worker_info()
            if info is not None and rank == int(bad_rank):
                seen.append(ids)
                if len(seen) * info.num_workers > bad_batch:
                    raise IndexError(
                        "index 2246 is out of bounds for axis 0 with size 563"
                    )
            return real(self, ids, epoch)

        TrainBatches.collate = collate
    elif kind == "validation" and rank == int(bad_rank):
        from transformer.training import loop

        def validate(*args, **kwargs):
            raise RuntimeError("injected validation fault")

        loop.validate = validate
    elif kind == "save" and rank == int(bad_rank):
        from transformer.training import checkpointing

        def atomic_save(state, path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        checkpointing.atomic_save = atomic_save
    sys.exit(train_main(sys.argv[1:]))
