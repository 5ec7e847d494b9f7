"""Which SentencePiece model a run trains with, decided in one place for every
command that needs it (``transformer-train``, ``transformer-preprocess``):

1. a resumed run keeps the tokenizer stored in its ``last.pt``;
2. a fine-tuning run takes its parent's (``training.init_from``);
3. model files the config names (``data.tokenizer.model`` / ``src_model``);
4. the run folder's own model, when its record (``spm.json``) says it was
   trained from what this config would train it from;
5. otherwise a new model, trained by rank 0 on a sample of the training data.

The loaded config is never changed: ``with_vocabulary`` returns a copy holding the
vocabulary sizes the tokenizer implies.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from transformer.checkpoint import same_tokenizer
from transformer.config import Config, ConfigError
from transformer.data import DataError, read_pairs, split_origin
from transformer.data.identity import corpus_identity
from transformer.files import atomic_write_bytes
from transformer.tokenizer import Tokenizer
from transformer.training.distributed import Distributed
from transformer.training.finetune import InitSource

log = logging.getLogger(__name__)

Origin = Literal["resumed", "parent", "given", "run folder", "trained"]


@dataclass
class TokenizerChoice:
    """The tokenizer a run trains with, where it came from and why (one line)."""

    tokenizer: Tokenizer
    origin: Origin
    why: str


def choose_tokenizer(
    cfg: Config,
    run_dir: Path,
    ranks: Distributed,
    resumed: dict[str, Any] | None = None,
    resumed_from: Path | None = None,
    parent: InitSource | None = None,
) -> TokenizerChoice:
    """The tokenizer of a run in ``run_dir``, by the order in the module docstring.

    Args:
        resumed: the checkpoint the run resumes from (``resumed_from``), if any.
        parent: what a fine-tuning run starts from, if it is one.
    """
    tcfg = cfg.data.tokenizer
    if resumed is not None:
        _check_resumed_tokenizer(cfg, resumed["tokenizer"], resumed_from)
        tokenizer = Tokenizer.from_state_dict(resumed["tokenizer"])
        return TokenizerChoice(tokenizer, "resumed", f"the one of {resumed_from}")
    if parent is not None:
        why = f"the parent's, training.init_from {parent.path}"
        return TokenizerChoice(parent.tokenizer, "parent", why)
    if tcfg.model or tcfg.src_model:
        files = tcfg.model or f"{tcfg.src_model}, {tcfg.tgt_model}"
        return TokenizerChoice(Tokenizer.from_files(tcfg), "given", files)
    return _run_folder_tokenizer(cfg, run_dir, ranks)


def with_vocabulary(cfg: Config, tokenizer: Tokenizer) -> Config:
    """A copy of ``cfg`` whose model takes its vocabulary sizes from ``tokenizer``
    (a size the config sets must match it)."""
    sizes = {}
    for side, size in (
        ("src", tokenizer.src_vocab_size),
        ("tgt", tokenizer.tgt_vocab_size),
    ):
        name = f"{side}_vocab_size"
        current = getattr(cfg.model, name)
        if current and current != size:
            raise ConfigError(
                f"model.{name}: {current} but the tokenizer has {size} pieces "
                "(leave it at 0 to take the tokenizer's size)"
            )
        sizes[name] = size
    if not tokenizer.shared_vocabulary and cfg.model.tie_src_tgt_embeddings:
        raise ConfigError(
            "model.tie_src_tgt_embeddings: needs a joint tokenizer "
            "(data.tokenizer.joint: true, or one data.tokenizer.vocab)"
        )
    model = dataclasses.replace(cfg.model, **sizes)
    model.validate()
    return dataclasses.replace(cfg, model=model)


def _check_resumed_tokenizer(cfg: Config, saved: dict, last: Path) -> None:
    """A resumed run keeps its own tokenizer: a config naming other model files
    is refused rather than recorded in config.yaml while being ignored."""
    tcfg = cfg.data.tokenizer
    if not (tcfg.model or tcfg.src_model):
        return
    if not same_tokenizer(Tokenizer.from_files(tcfg).state_dict(), saved):
        files = tcfg.model or f"{tcfg.src_model}, {tcfg.tgt_model}"
        raise ConfigError(
            f"data.tokenizer: {files} is not the tokenizer {last} was trained with; "
            "a resumed run keeps its own (drop the setting, or start a new "
            "training.run_dir)"
        )


TOKENIZER_RECORD = "spm.json"  # beside the run's own SentencePiece model


def tokenizer_record(cfg: Config) -> dict[str, Any]:
    """What the run's own SentencePiece model is trained from: the
    ``data.tokenizer`` settings, the training corpora (by content) and the seed
    that draws the sample."""
    tcfg = cfg.data.tokenizer
    cache = cfg.data.cache_dir or "cache"
    return {
        "joint": tcfg.joint,
        "vocab_size": tcfg.vocab_size,
        "model_type": tcfg.model_type,
        "character_coverage": tcfg.character_coverage,
        "sample_sentences": tcfg.sample_sentences,
        "seed": cfg.training.seed,
        "corpora": [
            [split, corpus_identity(d, split, cfg.training.seed, cache)]
            for d, split, _ in cfg.data.train_corpora()
        ],
        # the tags it reserves (a bilingual record has none: older records match)
        **({"tags": cfg.data.languages()} if cfg.data.multilingual else {}),
        **({"reserved": cfg.data.reserved()} if cfg.data.reserved() else {}),
    }


RECORD_KEYS = {"seed": "training.seed", "corpora": "the training corpora (data)"}


def tokenizer_differences(record: Path, wanted: dict[str, Any]) -> list[str] | None:
    """How the record of a run folder's SentencePiece model differs from what
    this config would train; None when there is no record (an older run)."""
    if not record.exists():
        return None
    try:
        trained = json.loads(record.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{record}: unreadable ({e}); delete it") from None
    if not isinstance(trained, dict):
        raise DataError(f"{record}: not a record of tokenizer settings; delete it")
    changed = []
    for key, value in wanted.items():
        if trained.get(key) == value:
            continue
        name = RECORD_KEYS.get(key, f"data.tokenizer.{key}")
        if key == "corpora":
            changed.append(f"{name}: other content")
        else:
            changed.append(
                f"{name}: trained with {trained.get(key)!r}, the config says {value!r}"
            )
    return changed


def _own_model(run_dir: Path, cfg: Config) -> Path:
    """The SentencePiece model a run trains for itself (the source one when
    source and target have their own)."""
    return run_dir / ("spm.model" if cfg.data.tokenizer.joint else "spm.src.model")


def saved_tokenizer_is_current(cfg: Config, run_dir: Path) -> bool:
    """Is the run folder's SentencePiece model the one this config would train
    (by its record)? Then a fresh run in the folder keeps it."""
    if not _own_model(run_dir, cfg).exists():
        return False
    try:
        changed = tokenizer_differences(
            run_dir / TOKENIZER_RECORD, tokenizer_record(cfg)
        )
    except DataError:
        return False
    return changed == []


def _run_folder_tokenizer(
    cfg: Config, run_dir: Path, ranks: Distributed
) -> TokenizerChoice:
    """The run folder's own SentencePiece model when it was trained from what
    this config would train it from, or a new one that rank 0 trains on a sample
    of the training data while the other ranks wait for it."""
    tcfg = cfg.data.tokenizer
    saved = _own_model(run_dir, cfg)
    existed = saved.exists()
    record = run_dir / TOKENIZER_RECORD

    def train_or_load() -> Tokenizer:
        wanted = tokenizer_record(cfg)
        changed = tokenizer_differences(record, wanted) if saved.exists() else None
        if changed:
            raise DataError(
                f"{saved} was trained with other settings ({'; '.join(changed)}): "
                "restore them, or delete it to train a new one (transformer-train "
                "--overwrite does)"
            )
        if not saved.exists() and cfg.data.multilingual:
            texts = sample_by_language(cfg)
            for lang, lines in texts.items():
                if not any(line.strip() for line in lines):
                    raise DataError(
                        f"data.pairs: the training corpora hold no {lang} text to "
                        "train the tokenizer on"
                    )
            log.info(
                "tokenizer: training on %s sentences",
                ", ".join(f"{len(v)} {k}" for k, v in texts.items()),
            )
            every = [line for lines in texts.values() for line in lines]
            trained = Tokenizer.train(
                tcfg, every, [], tags=list(texts), extra=cfg.data.reserved()
            )
            atomic_write_bytes(record, (json.dumps(wanted, indent=1) + "\n").encode())
            trained.save(run_dir)
        elif not saved.exists():
            src, tgt, seen = sample_pairs(cfg)
            for side, texts in (("source", src), ("target", tgt)):
                if not any(text.strip() for text in texts):
                    origins = ", ".join(
                        split_origin(d, split)
                        for d, split, _ in cfg.data.train_corpora()
                    )
                    raise DataError(
                        f"{origins}: the training corpus has no {side} text "
                        f"({seen} pairs) to train the tokenizer on"
                    )
            log.info("tokenizer: training on %d of %d pairs", len(src), seen)
            trained = Tokenizer.train(tcfg, src, tgt, extra=cfg.data.reserved())
            got = max(trained.src_vocab_size, trained.tgt_vocab_size)
            if got < tcfg.vocab_size:
                log.warning(
                    "data.tokenizer.vocab_size: %d asked for, the corpus gave %d "
                    "pieces",
                    tcfg.vocab_size,
                    got,
                )
            atomic_write_bytes(record, (json.dumps(wanted, indent=1) + "\n").encode())
            trained.save(run_dir)  # after the record: a model is never unrecorded
        if tcfg.joint:
            return Tokenizer((run_dir / "spm.model").read_bytes())
        return Tokenizer(
            (run_dir / "spm.src.model").read_bytes(),
            (run_dir / "spm.tgt.model").read_bytes(),
        )

    tokenizer = ranks.main_first(train_or_load, "training the SentencePiece model")
    if existed:
        why = f"{saved}, trained earlier from the same settings and corpora"
        return TokenizerChoice(tokenizer, "run folder", why)
    return TokenizerChoice(tokenizer, "trained", f"a new one, saved as {saved}")


def sample_pairs(cfg: Config) -> tuple[list[str], list[str], int]:
    """At most ``data.tokenizer.sample_sentences`` pairs drawn uniformly from all
    training corpora, read in a stream (reservoir sampling, seeded); also returns
    how many pairs were read."""
    size = cfg.data.tokenizer.sample_sentences
    rng = random.Random(cfg.training.seed)
    sample: list[tuple[str, str]] = []
    seen = 0
    for settings, split, _ in cfg.data.train_corpora():
        for pair in read_pairs(settings, split, cfg.training.seed):
            seen += 1
            if len(sample) < size:
                sample.append(pair)
            else:
                j = rng.randrange(seen)
                if j < size:
                    sample[j] = pair
    return [s for s, _ in sample], [t for _, t in sample], seen


def sample_by_language(cfg: Config) -> dict[str, list[str]]:
    """Per language, sentences to train a multilingual tokenizer on, drawn in a
    stream (reservoir sampling, seeded): ``data.tokenizer.sample_sentences`` in
    all, the same number from each language; a language's text shared by several
    directions (``train.en`` of de-en and fr-en) is read once."""
    langs = cfg.data.languages()
    each = max(cfg.data.tokenizer.sample_sentences // len(langs), 1)
    rng = random.Random(cfg.training.seed)
    samples: dict[str, list[str]] = {lang: [] for lang in langs}
    seen_lines = dict.fromkeys(langs, 0)
    read: set[tuple] = set()
    for settings, split, _ in cfg.data.train_corpora():
        sides = []
        for index, lang in enumerate((settings.src_lang, settings.tgt_lang)):
            other = settings.tgt_lang if index == 0 else settings.src_lang
            # a text corpus's side is its own file, whatever the other side is
            key = (lang, split, settings.format, settings.dir, settings.hub_name)
            if settings.format != "text":
                key += (settings.hub_config, other)
            if key not in read:
                read.add(key)
                sides.append((index, lang))
        if not sides:
            continue
        for pair in read_pairs(settings, split, cfg.training.seed):
            for index, lang in sides:
                seen_lines[lang] += 1
                text, sample = pair[index], samples[lang]
                if len(sample) < each:
                    sample.append(text)
                else:
                    j = rng.randrange(seen_lines[lang])
                    if j < each:
                        sample[j] = text
    return samples
