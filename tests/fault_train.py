"""``transformer-train`` with a fault injected into a data worker (run by the tests,
alone or under torchrun).

``FAULT_WORKER=RANK:BATCH`` makes the data worker of rank RANK (0 without
torchrun) that collates batch BATCH of the first epoch raise ``IndexError``, as
a worker reading a cut store did. The patch is made before the workers fork, so
they inherit it; the main process's own collation is left alone. Each process
writes its pid to ``$FAULT_PIDS/pid<rank>`` first.
"""

import os
import sys
from pathlib import Path

from torch.utils.data import get_worker_info

from transformer.cli import train_main
from transformer.data import TrainBatches

if __name__ == "__main__":
    rank = int(os.environ.get("RANK", "0"))
    if os.environ.get("FAULT_PIDS"):
        Path(os.environ["FAULT_PIDS"], f"pid{rank}").write_text(str(os.getpid()))
    bad_rank, bad_batch = map(int, os.environ["FAULT_WORKER"].split(":"))
    real = TrainBatches.collate
    seen = []

    def collate(self, ids):
        if get_worker_info() is not None and rank == bad_rank:
            seen.append(ids)
            if len(seen) * get_worker_info().num_workers > bad_batch:
                raise IndexError("index 2246 is out of bounds for axis 0 with size 563")
        return real(self, ids)

    TrainBatches.collate = collate
    sys.exit(train_main(sys.argv[1:]))
