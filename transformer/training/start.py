"""How a run starts: resumed from its ``last.pt``, fine-tuned from another run's
weights (``training.init_from``), or fresh; the run folder made ready for it, the
tokenizer chosen, and the checks that a resumed or fine-tuned run means the same
model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformer.checkpoint import check_compatible, checkpoint_config, load_checkpoint
from transformer.config import Config, save_config
from transformer.tokenizer import Tokenizer
from transformer.training.build import (
    build_tokenizer,
    check_resumed_tokenizer,
    saved_tokenizer_is_current,
    set_vocab_sizes,
)
from transformer.training.checkpointing import check_lr_meaning, prepare_run_dir
from transformer.training.distributed import Distributed
from transformer.training.finetune import InitSource, load_init

log = logging.getLogger(__name__)


@dataclass
class RunStart:
    """What a run starts from: ``ckpt`` when it resumes ``last``, ``init`` when
    it is fine-tuned, neither when fresh; and the tokenizer it trains with."""

    last: Path
    ckpt: dict[str, Any] | None
    init: InitSource | None
    tokenizer: Tokenizer


def start_run(
    cfg: Config, run_dir: Path, resume: bool | None, ranks: Distributed
) -> RunStart:
    """Decide how the run starts (``resume``: None follows
    ``training.resume``), prepare ``run_dir``, pick the tokenizer, fill in the
    vocabulary sizes, check compatibility and write ``config.yaml``."""
    t = cfg.training
    last = run_dir / "last.pt"
    if resume and not last.exists():
        log.warning("--resume: %s does not exist: starting a new run", last)
    resume = t.resume == "auto" if resume is None else resume
    ckpt = load_checkpoint(last) if resume and last.exists() else None
    init = None  # fine-tuning applies to a fresh run only
    if t.init_from is not None and ckpt is not None:
        log.info("%s exists: resuming it; training.init_from is not used", last)
    elif t.init_from is not None:
        init = load_init(cfg)  # read before anything in the folder is deleted
        set_vocab_sizes(cfg, init.tokenizer)
        init.check(cfg)  # and refused before, with training.overwrite too
    if ckpt is None:
        own = not (cfg.data.tokenizer.model or cfg.data.tokenizer.src_model)
        drop_tokenizer = (
            t.overwrite
            and own
            and init is None
            and not saved_tokenizer_is_current(cfg, run_dir)
        )
        protect = [Path(t.init_from)] if t.init_from is not None else []
        ranks.on_main(  # rank 0 alone: others could race its next files
            lambda: prepare_run_dir(run_dir, t.overwrite, drop_tokenizer, protect),
            "preparing the run folder",
        )
        t.overwrite = False  # done: the saved config does not delete again
    if ckpt is not None:
        tokenizer = Tokenizer.from_state_dict(ckpt["tokenizer"])
        check_resumed_tokenizer(cfg, ckpt["tokenizer"], last)
    elif init is not None:
        tokenizer = init.tokenizer
    else:
        tokenizer = build_tokenizer(cfg, run_dir, ranks)
    set_vocab_sizes(cfg, tokenizer)
    if ckpt is not None:
        check_compatible(checkpoint_config(ckpt, last).model, cfg.model, last)
        check_lr_meaning(ckpt, cfg, last)
    if ranks.main:
        save_config(cfg, run_dir / "config.yaml")
    return RunStart(last, ckpt, init, tokenizer)
