"""`distil prepare-data`: tokenize a corpus into the training set that the distill stage reads.

    distil prepare-data data=local 'data.paths=[corpus/*.txt]' run_dir=runs/exp1
    distil prepare-data run_dir=runs/exp1      # English Wikipedia + BookCorpus from the hub (needs network)

Writes `<run_dir>/prepare-data/` (see distilbert_cli.artifacts.PreparedData):
- `dataset/`: a `datasets.DatasetDict` (`save_to_disk`) with splits `train` and `validation`, columns
  `input_ids` ([CLS] ... [SEP], at most `max_seq_length` ids) and `length`;
- `token_counts.npy`: int64 counts of every token id over the train split (special tokens included), for the
  masking's frequency smoothing;
- `tokenizer/`: the teacher's tokenizer, so later stages can check vocabulary compatibility;
- `stats.json`: documents read, sequences and tokens written, what was dropped and why, a length histogram,
  throughput, the bad-lines policy and whether the word memo was used (`word_memo`: used, and why).

The corpus never sits in Python memory: local files are streamed into an Arrow file, hub datasets are Arrow
already, and tokenization runs as a batched, multi-process `datasets.map` over memory-mapped data. Tokenizers
that work word by word (BERT's WordPiece, SentencePiece-style Unigram as in XLM-R) are memoized word by word
where a start-up probe proves the same ids (`DocumentEncoder`), which is several times faster; byte-level BPE
(RoBERTa, ModernBERT) tokenizes whole documents.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from distilbert_cli import artifacts
from distilbert_cli.data.corpus import check_corpus_file, corpus_paths, resolve_corpus_files
from distilbert_cli.data.prepared import build_prepared
from distilbert_cli.errors import UsageError
from distilbert_cli.models.families import max_sequence_length
from distilbert_cli.models.loading import load_config, load_tokenizer
from distilbert_cli.rundir import Run, temporary_path, write_json_atomic
from distilbert_cli.schema import HubData, LocalData, PrepareData

log = logging.getLogger(__name__)


def _check_tokenizer(tokenizer, cfg: PrepareData) -> None:
    """The tokenizer frames sequences, and every sequence fits the model: the tokenizer's model_max_length, and the
    teacher's position table (a tokenizer may record no maximum; the positions always bound the length)."""
    name = cfg.teacher.name_or_path
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise UsageError(f"tokenizer {name!r} has no [CLS]/[SEP] (cls_token/sep_token) tokens to frame sequences")
    if cfg.prepare.max_seq_length > tokenizer.model_max_length:
        raise UsageError(f"prepare.max_seq_length={cfg.prepare.max_seq_length} exceeds the model_max_length "
                         f"{tokenizer.model_max_length} of tokenizer {name!r}")
    if Path(name).expanduser().is_dir() and not (Path(name).expanduser() / "config.json").is_file():
        return  # a tokenizer folder without its model: no position table to check against
    longest = max_sequence_length(load_config(name, cfg.trust_remote_code, role="teacher"))
    if longest is not None and cfg.prepare.max_seq_length > longest:
        raise UsageError(f"prepare.max_seq_length={cfg.prepare.max_seq_length} exceeds the {longest} tokens the "
                         f"teacher {name!r} has positions for")



def _record_corpus(stage, data: LocalData | HubData) -> None:
    if data.source == "hub":
        for source in data.datasets:
            revision = f"@{source.revision}" if source.revision else ""
            stage.use_reference(f"{source.name}/{source.config}:{source.split}{revision}", "corpus")
        return
    for entry in corpus_paths(data):
        path = Path(entry).expanduser()
        if path.exists():
            stage.use_path(path, "corpus")
        else:
            stage.use_reference(entry, "corpus glob")



def run(cfg: PrepareData, overrides: Sequence[str] = ()) -> Path:
    """Tokenize the configured corpus into `<run_dir>/prepare-data/`; returns that directory."""
    started = time.perf_counter()
    files = resolve_corpus_files(corpus_paths(cfg.data)) if cfg.data.source == "local" else []
    for path in files:
        check_corpus_file(path, cfg.data.text_field)
    tokenizer = load_tokenizer(cfg.teacher.name_or_path, cfg.trust_remote_code, role="teacher tokenizer")
    _check_tokenizer(tokenizer, cfg)

    with Run.of(cfg).open_stage(artifacts.PREPARE_DATA, cfg, overrides,
                                unfingerprinted=artifacts.UNFINGERPRINTED[artifacts.PREPARE_DATA]) as stage:
        stage.use_model(cfg.teacher.name_or_path, "tokenizer")
        _record_corpus(stage, cfg.data)
        stage.update(tokenizer=cfg.teacher.name_or_path, vocab_size=len(tokenizer),
                     max_seq_length=cfg.prepare.max_seq_length)
        out = artifacts.PreparedData(stage.path)
        stage.expect(*out.files)
        work_dir = temporary_path(stage.path / "work")
        work_dir.mkdir()
        stats = build_prepared(cfg.data, cfg.prepare, cfg.seed, tokenizer, files, out, work_dir,
                               time.perf_counter() - started)
        shutil.rmtree(work_dir)  # on failure open_stage removes it (and names it if the disk was full)
        tokenizer.save_pretrained(out.tokenizer)
        write_json_atomic(out.stats, stats)
        stage.update(sequences=stats["sequences_written"], tokens=stats["tokens_written"],
                     word_memo=stats["word_memo"]["used"])
        log.info("wrote %d train + %d validation sequences (%d tokens) from %d documents in %.1f s "
                 "(%.0f tokens/s); dropped: %s", stats["sequences_written"]["train"],
                 stats["sequences_written"]["validation"], stats["tokens_written"]["total"],
                 stats["documents_read"], stats["seconds"], stats["tokens_per_second"],
                 ", ".join(f"{name} {d['count']}" for name, d in stats["dropped"].items()))
    return stage.path
