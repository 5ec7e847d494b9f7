"""CTranslate2 as a user runs it, for ``benchmark.py decode``: a fresh process
that imports only ctranslate2 and sentencepiece, tokenizes, calls
``translate_batch`` once for all sentences (CTranslate2's own length limit and
length penalty), detokenizes, and writes the texts, the seconds and its peak RSS.

    python scripts/bench_ct2.py EXPORT_DIR SOURCES.json OUT.json --beam 5 --threads 2

``--repeats N`` times N runs after the warm-up and reports the median.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path


def peak_rss_mib() -> float:
    """This process's own peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux
    carries that over from the parent at fork, through exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export_dir")
    parser.add_argument("sources", help="a JSON list of sentences")
    parser.add_argument("output")
    parser.add_argument("--beam", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--compute-type", default="default")
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs; the median counts"
    )
    args = parser.parse_args()

    import ctranslate2
    import sentencepiece as spm

    export = Path(args.export_dir)
    # transformer.export.EXPORT_INFO, written out: this process must not load torch
    info = json.loads((export / "export.json").read_text(encoding="utf-8"))
    files = info["tokenizer"]
    src = spm.SentencePieceProcessor(model_file=str(export / files["source_model"]))
    tgt = spm.SentencePieceProcessor(model_file=str(export / files["target_model"]))
    translator = ctranslate2.Translator(
        str(export),
        device="cpu",
        compute_type=args.compute_type,
        intra_threads=args.threads,
    )
    sources = json.loads(Path(args.sources).read_text(encoding="utf-8"))
    suppress = [[p] for p in info["suppress_tokens"]]
    limit = info["max_positions"] - 1

    def translate(sentences: list[str]) -> list[str]:
        out = translator.translate_batch(
            src.encode(sentences, out_type=str),
            max_batch_size=max(args.max_batch_tokens // args.beam, 1),
            batch_type="tokens",
            beam_size=args.beam,
            max_input_length=limit,
            max_decoding_length=limit,
            suppress_sequences=suppress,
        )
        return [tgt.decode(r.hypotheses[0]) for r in out]

    translate(sources[:16])  # warm-up, as the torch rows
    runs = []
    for _ in range(max(args.repeats, 1)):
        start = time.perf_counter()
        hyps = translate(sources)
        runs.append(time.perf_counter() - start)
    result = {
        "seconds": statistics.median(runs),
        **({"seconds_runs": runs} if len(runs) > 1 else {}),
        "hypotheses": hyps,
        "compute_type": translator.compute_type,
        "peak_rss_mib": peak_rss_mib(),
    }
    Path(args.output).write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main()
