"""How a run starts, in order: the corpus made available (``with_corpus``), then
what the run starts from (``read_start``: its own ``last.pt`` when it resumes,
another run's weights when it is fine-tuned with ``training.init_from``, nothing
when fresh), the run folder made ready, the tokenizer chosen
(``tokenizer_choice``) and the checks that a resumed or fine-tuned run means the
same model. The loaded config is never changed: each step that derives a value
(the download folder, the corpus cache, the vocabulary sizes) returns a resolved
copy, which the run saves as ``config.yaml`` and in its checkpoints."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformer.checkpoint import check_compatible, checkpoint_config, load_checkpoint
from transformer.config import Config, save_config
from transformer.data.download import ensure_corpus
from transformer.tokenizer import Tokenizer
from transformer.training.checkpointing import check_lr_meaning, prepare_run_dir
from transformer.training.distributed import Distributed
from transformer.training.finetune import InitSource, load_init
from transformer.training.tokenizer_choice import (
    TokenizerChoice,
    choose_tokenizer,
    saved_tokenizer_is_current,
    with_vocabulary,
)

log = logging.getLogger(__name__)


def with_corpus(cfg: Config, run_dir: Path) -> Config:
    """A copy of ``cfg`` whose ``data.dir`` holds the corpus (downloaded when it
    is missing and the config names its source) and whose corpus stores live in
    ``data.cache_dir`` (default: ``run_dir/cache``)."""
    data = ensure_corpus(cfg.data)
    if data.cache_dir is None:
        data = dataclasses.replace(data, cache_dir=str(run_dir / "cache"))
    return dataclasses.replace(cfg, data=data)


def read_start(
    cfg: Config, run_dir: Path, resume: bool | None
) -> tuple[dict[str, Any] | None, InitSource | None]:
    """What a run in ``run_dir`` starts from: its ``last.pt`` when it resumes
    (``resume``: None follows ``training.resume``), ``training.init_from`` when it
    is a new fine-tuning run, neither when it starts afresh."""
    t = cfg.training
    last = run_dir / "last.pt"
    if resume and not last.exists():
        log.warning("--resume: %s does not exist: starting a new run", last)
    resume = t.resume == "auto" if resume is None else resume
    if resume and last.exists():
        if t.init_from is not None:
            log.info("%s exists: resuming it; training.init_from is not used", last)
        return load_checkpoint(last), None
    if t.init_from is not None:
        return None, load_init(cfg)
    return None, None


@dataclass
class RunStart:
    """What a run starts from: ``ckpt`` when it resumes ``last``, ``init`` when
    it is fine-tuned, neither when fresh; its tokenizer, and the resolved config
    it trains with."""

    last: Path
    ckpt: dict[str, Any] | None
    init: InitSource | None
    choice: TokenizerChoice
    config: Config

    @property
    def tokenizer(self) -> Tokenizer:
        return self.choice.tokenizer


def start_run(
    cfg: Config, run_dir: Path, resume: bool | None, ranks: Distributed
) -> RunStart:
    """Decide how the run starts (``resume``: None follows ``training.resume``),
    prepare ``run_dir``, choose the tokenizer, check compatibility and write
    ``config.yaml``; ``cfg`` should come from ``with_corpus``."""
    t = cfg.training
    last = run_dir / "last.pt"
    ckpt, init = read_start(cfg, run_dir, resume)
    if init is not None:  # refused before anything is deleted, --overwrite too
        init.check(with_vocabulary(cfg, init.tokenizer))
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
    choice = choose_tokenizer(cfg, run_dir, ranks, ckpt, last, init)
    if ranks.main:
        log.info("tokenizer: %s (%s)", choice.why, choice.origin)
    # done deleting: the saved config does not delete again
    training = dataclasses.replace(t, overwrite=False)
    config = dataclasses.replace(
        with_vocabulary(cfg, choice.tokenizer), training=training
    )
    if ckpt is not None:
        check_compatible(checkpoint_config(ckpt, last).model, config.model, last)
        check_lr_meaning(ckpt, config, last)
    if ranks.main:
        save_config(config, run_dir / "config.yaml")
    return RunStart(last, ckpt, init, choice, config)
