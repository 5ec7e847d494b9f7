"""Decoding under control (``python scripts/benchmark.py control``): terminology
constraints, target prefixes and scoring, on Multi30k test_2016_flickr with the
published de->en and en->de models:

    python scripts/benchmark.py control --sentences 300

- Terminology: from each reference, 1 to 3 content-word phrases (seeded; words
  outside a stop list, of at most 3 pieces) as required phrases of beam search
  (dynamic beam allocation); the share met, BLEU and chrF with and without them,
  and the decoding time constrained against plain beam search of the same
  sentences. The two run interleaved, chunk by chunk, in alternating order, so
  that a busy machine slows both alike; the load average is recorded.
- Prefix: the reference's first 1, 2 and 3 words as prefix (ending the word);
  BLEU of the rest of the output against the rest of the reference, and time.
- Scoring: sentence pairs a second through ``transformer.scoring`` against the
  training code's teacher-forced validation loss over the same pairs and model
  (``transformer.training.validation.evaluate_loss``: the forward pass in
  batches of the same tokens, the loss without smoothing, and the accuracy), the
  median of three interleaved runs each, and how far the two totals differ.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from pathlib import Path

import torch
from bench_common import ROOT, machine

MODELS = {
    "de-en": "models/multi30k_de_en_tiny_b.safetensors",
    "en-de": "models/multi30k_en_de_tiny_c.safetensors",
}
# function words, which make poor terminology
_STOP_EN = (
    "a an the and or but of in on at to for with by from into onto over under "
    "up down out off near next while as is are was were be been being has have "
    "had do does did it its this that these those there here his her their "
    "they them he she him we you i my your our some one two three another "
    "other each while who which what where when very so not no than then"
)
_STOP_DE = (
    "der die das den dem des ein eine einer einem einen eines und oder aber "
    "in im auf an am zu zum zur für mit von vom aus bei über unter vor hinter "
    "neben nach durch um ist sind war waren wird werden hat haben sich es er "
    "sie ihr ihre ihren sein seine seinem seinen seiner wir ich du man dieser "
    "diese dieses jener zwei drei einige andere anderen etwas sehr nicht kein "
    "keine als wie dass während"
)
STOP = {"en": set(_STOP_EN.split()), "de": set(_STOP_DE.split())}
WORD = re.compile(r"^[\w-]+$")


def add_parser(sub) -> None:
    p = sub.add_parser("control", help="constraints, prefixes and scoring")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/multi30k"))
    p.add_argument("--split", default="test_2016_flickr")
    p.add_argument(
        "--sentences", type=int, default=0, help="the first N sentences (0: all)"
    )
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--chunk", type=int, default=50, help="sentences per timed chunk")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)


def terms(reference: str, lang: str, tokenizer, rng: random.Random) -> list[str]:
    """1 to 3 phrases of content words of ``reference``, each of at most 3 pieces:
    a word, or two neighbours when both are content words and fit."""
    words = [w.strip(".,;:!?\"'()") for w in reference.split()]
    content = [
        i
        for i, w in enumerate(words)
        if len(w) > 2 and WORD.match(w) and w.lower() not in STOP[lang]
    ]
    rng.shuffle(content)
    wanted = rng.randint(1, 3)
    phrases, used = [], set()
    for i in content:
        if len(phrases) == wanted:
            break
        if i in used:
            continue
        phrase = [i]
        if i + 1 in content and i + 1 not in used and rng.random() < 0.3:
            phrase.append(i + 1)
        text = " ".join(words[j] for j in phrase)
        if len(tokenizer.encode_tgt([text])[0]) > 3:
            if len(phrase) == 1:
                continue
            text = words[i]
            phrase = [i]
            if len(tokenizer.encode_tgt([text])[0]) > 3:
                continue
        phrases.append(text)
        used.update(phrase)
    return phrases


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_direction(args, name: str, checkpoint: str, device) -> dict:
    from transformer.controls import Controls
    from transformer.data import read_text_pairs
    from transformer.data.corpus import ParallelCorpus
    from transformer.evaluation import score_corpus
    from transformer.inference import Translator
    from transformer.training.validation import evaluate_loss

    src_lang, tgt_lang = name.split("-")
    translator = Translator.load([ROOT / checkpoint], device)
    data = Path(args.data_dir)
    pairs = list(
        read_text_pairs(
            data / f"{args.split}.{src_lang}.gz", data / f"{args.split}.{tgt_lang}.gz"
        )
    )
    if args.sentences:
        pairs = pairs[: args.sentences]
    sources, refs = [s for s, _ in pairs], [t for _, t in pairs]
    rng = random.Random(args.seed)
    phrases = [terms(r, tgt_lang, translator.tokenizer, rng) for r in refs]
    controls = [Controls(constraints=tuple(p)) if p else None for p in phrases]
    dcfg = translator.decoding({"beam_size": args.beam})
    # warm up (first calls allocate)
    translator.translate_controlled(sources[:8], dcfg, controls[:8])
    plain_out, constrained_out = [], []
    plain_s = constrained_s = 0.0
    for n, start in enumerate(range(0, len(sources), args.chunk)):
        chunk = slice(start, start + args.chunk)

        def plain(chunk=chunk):
            return translator.translate_controlled(sources[chunk], dcfg)

        def constrained(chunk=chunk):
            return translator.translate_controlled(
                sources[chunk], dcfg, controls[chunk]
            )

        runs = [(plain, False), (constrained, True)]
        for fn, is_constrained in runs if n % 2 == 0 else runs[::-1]:
            out, seconds = _timed(fn)
            if is_constrained:
                constrained_out += out
                constrained_s += seconds
            else:
                plain_out += out
                plain_s += seconds
    total = sum(len(p) for p in phrases)
    unmet = sum(len(o.translations[0].unmet) for o in constrained_out)
    in_text = sum(
        p in o.translations[0].text
        for o, ps in zip(constrained_out, phrases, strict=True)
        for p in ps
    )
    plain_scores = score_corpus([o.translations[0].text for o in plain_out], refs)
    cons_scores = score_corpus([o.translations[0].text for o in constrained_out], refs)
    terminology = {
        "sentences": len(sources),
        "constraints": total,
        "sentences_with_constraints": sum(1 for p in phrases if p),
        "per_sentence": total / len(sources),
        "met_share": (total - unmet) / total,
        "in_text_share": in_text / total,
        "bleu_plain": plain_scores["bleu"],
        "bleu_constrained": cons_scores["bleu"],
        "chrf_plain": plain_scores["chrf"],
        "chrf_constrained": cons_scores["chrf"],
        "seconds_plain": plain_s,
        "seconds_constrained": constrained_s,
        "time_ratio": constrained_s / plain_s,
        "examples": [
            {"constraints": p, "output": o.translations[0].text}
            for p, o in list(zip(phrases, constrained_out, strict=True))[:3]
        ],
    }
    logging.info("%s terminology: %s", name, terminology)
    prefix = {}
    for n in (1, 2, 3):
        keep = [i for i, r in enumerate(refs) if len(r.split()) > n]
        given = [" ".join(refs[i].split()[:n]) + " " for i in keep]
        out, seconds = _timed(
            lambda keep=keep, given=given: translator.translate_controlled(
                [sources[i] for i in keep], dcfg, [Controls(prefix=g) for g in given]
            )
        )
        rest_hyp = [
            " ".join(o.translations[0].text.split()[n:]) for o in out
        ]  # the words after the prefix
        rest_ref = [" ".join(refs[i].split()[n:]) for i in keep]
        free = [" ".join(plain_out[i].translations[0].text.split()[n:]) for i in keep]
        prefix[f"{n}_words"] = {
            "sentences": len(keep),
            "starts_with_prefix": sum(
                o.translations[0].text.startswith(g.strip())
                for o, g in zip(out, given, strict=True)
            )
            / len(keep),
            "bleu_rest": score_corpus(rest_hyp, rest_ref)["bleu"],
            "bleu_rest_without_prefix": score_corpus(free, rest_ref)["bleu"],
            "seconds": seconds,
            "seconds_plain_same_sentences": plain_s * len(keep) / len(sources),
        }
        logging.info("%s prefix %d: %s", name, n, prefix[f"{n}_words"])
    # scoring: transformer.scoring against the training code's validation loss
    tok = translator.tokenizer
    corpus = ParallelCorpus(tok.encode_src(sources), tok.encode_tgt(refs))
    max_tokens = translator.config.decoding.max_tokens
    small = ParallelCorpus(corpus.src[:16], corpus.tgt[:16])
    translator.score(sources[:16], refs[:16])  # warm up both
    evaluate_loss(translator.model, small, max_tokens, device, "fp32")
    score_runs, loss_runs = [], []
    for _ in range(3):  # interleaved; the median of each
        scores, seconds = _timed(
            lambda: translator.score(sources, refs, None, max_tokens)
        )
        score_runs.append(seconds)
        loss, seconds = _timed(
            lambda: evaluate_loss(translator.model, corpus, max_tokens, device, "fp32")
        )
        loss_runs.append(seconds)
    score_s, loss_s = sorted(score_runs)[1], sorted(loss_runs)[1]
    total_score = sum(s.total for s in scores)
    scoring = {
        "pairs": len(sources),
        "pairs_per_s": len(sources) / score_s,
        "training_loss_pairs_per_s": len(sources) / loss_s,
        "speed_ratio": loss_s / score_s,
        "total_log_probability": total_score,
        "training_loss_total": -loss["loss"] * loss["tokens"],
        "relative_difference": abs(total_score + loss["loss"] * loss["tokens"])
        / abs(total_score),
        "max_tokens": max_tokens,
    }
    logging.info("%s scoring: %s", name, scoring)
    return {
        "checkpoint": checkpoint,
        "terminology": terminology,
        "prefix": prefix,
        "scoring": scoring,
    }


def bench_control(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else "cpu")
    load_before = os.getloadavg()
    start = time.perf_counter()
    rows = {
        name: bench_direction(args, name, path, device) for name, path in MODELS.items()
    }
    return {
        "split": args.split,
        "sentences": args.sentences or "all",
        "beam": args.beam,
        "seed": args.seed,
        "directions": rows,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "seconds": time.perf_counter() - start,
        "machine": machine(),
    }
