"""Reading a corpus: local .txt / .jsonl / .parquet files (files, directories, globs) or hub datasets, streamed
into one Arrow `text` column that `datasets` memory-maps, so the corpus never sits in Python memory."""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
from tqdm.auto import tqdm

from distilbert_cli.errors import UsageError, first_line
from distilbert_cli.logs import is_main_process

if TYPE_CHECKING:
    from distilbert_cli.schema import HubData, LocalData

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")

_SNIFF_BYTES = 8192
_PROGRESS_BYTES = 1 << 20
_WRITE_CHUNK_CHARS = 1 << 23  # text per Arrow record batch while streaming a corpus to disk


def corpus_paths(data: LocalData) -> list[str]:
    return [data.paths] if isinstance(data.paths, str) else list(data.paths)



def resolve_corpus_files(paths: Sequence[str]) -> list[Path]:
    """The files named by `data.paths`: files, directories (searched recursively) and globs, in a stable order."""
    if not paths:
        raise UsageError("data.paths is empty: give files, directories or globs of .txt, .jsonl or .parquet")
    kinds = ", ".join(LOCAL_SUFFIXES)
    files: list[Path] = []
    for entry in paths:
        path = Path(entry).expanduser()
        if path.is_file():
            if path.suffix not in LOCAL_SUFFIXES:
                raise UsageError(f"unsupported corpus file {entry}: expected one of {kinds}")
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
            if not found:
                raise UsageError(f"no {kinds} files in directory {entry}")
        elif any(char in str(entry) for char in "*?["):
            found = sorted(p for p in map(Path, glob.glob(str(path), recursive=True))
                           if p.is_file() and p.suffix in LOCAL_SUFFIXES)
            if not found:
                raise UsageError(f"no {kinds} files match {entry}")
        else:
            raise UsageError(f"corpus path not found: {entry}")
        files.extend(found)
    return list(dict.fromkeys(files))


def check_corpus_file(path: Path, text_field: str) -> None:
    """Refuse files that cannot be a corpus (binary, unreadable Parquet, wrong field) before any heavy work."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowException) as exc:
            raise UsageError(f"{path} is not a readable Parquet file: {first_line(exc)}") from exc
        if text_field not in schema.names:
            raise UsageError(f"{path} has no column {text_field!r} (columns: {', '.join(map(repr, schema.names))}; "
                             f"set data.text_field)")
        column_type = schema.field(text_field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise UsageError(f"{path}: column {text_field!r} is {column_type}, not text")
        return
    with path.open("rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    if b"\0" in head:
        raise UsageError(f"{path} is not a text file (it contains NUL bytes)")
    if path.suffix == ".jsonl":
        for raw in head.splitlines():
            try:
                record = json.loads(raw)
            except (ValueError, RecursionError):
                continue  # an unreadable line is the bad-lines policy's business
            if isinstance(record, dict) and text_field not in record:
                raise UsageError(f"{path}: records have no field {text_field!r} (fields: "
                                 f"{', '.join(map(repr, record))}; set data.text_field)")
            return


@dataclass
class BadLines:
    """Lines that are binary (a NUL byte), not valid UTF-8, or not a JSON record with text: skipped and counted, or
    fatal. Every line is checked, so a binary region past the first 8 KB that check_corpus_file sniffs is caught."""

    policy: str
    count: int = 0

    def handle(self, where: str, why: str, count: int = 1) -> None:
        if self.policy == "fail":
            raise UsageError(f"{where}: {why} (data.bad_lines=fail; use skip to drop such lines)")
        self.count += count


def _decoded_lines(path: Path, bad: BadLines, progress: tqdm) -> Iterator[tuple[int, str]]:
    unreported = 0  # bytes read since the progress bar last moved (moving it for every line would cost more)
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            unreported += len(raw)
            if unreported >= _PROGRESS_BYTES:
                progress.update(unreported)
                unreported = 0
            if b"\0" in raw:  # the first 8 KB were text (check_corpus_file), so this is a binary region
                bad.handle(f"{path}:{number}", "binary data (a NUL byte)")
                continue
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError:
                bad.handle(f"{path}:{number}", "not valid UTF-8")
    progress.update(unreported)


def _txt_documents(path: Path, txt_split: str, bad: BadLines, progress: tqdm) -> Iterator[str]:
    if txt_split == "line":
        for _, line in _decoded_lines(path, bad, progress):
            if text := line.strip():
                yield text
        return
    paragraph: list[str] = []
    for _, line in _decoded_lines(path, bad, progress):
        if line.strip():
            paragraph.append(line.rstrip("\r\n"))
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def _jsonl_documents(path: Path, text_field: str, bad: BadLines, progress: tqdm) -> Iterator[str]:
    for number, line in _decoded_lines(path, bad, progress):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            bad.handle(f"{path}:{number}", "not valid JSON")
            continue
        text = record.get(text_field) if isinstance(record, dict) else None
        if isinstance(text, str):
            yield text
        else:
            bad.handle(f"{path}:{number}", f"not a JSON object with a string field {text_field!r}")


def _parquet_documents(path: Path, text_field: str, bad: BadLines, progress: tqdm) -> Iterator[str]:
    import pyarrow.parquet as pq

    row = 0
    try:
        parquet = pq.ParquetFile(path)
        bytes_per_row = path.stat().st_size / max(parquet.metadata.num_rows, 1)
        for batch in parquet.iter_batches(columns=[text_field]):
            for offset, text in enumerate(batch.column(0).to_pylist()):
                if text is None:
                    bad.handle(f"{path} row {row + offset + 1}", f"no {text_field!r} value")
                else:
                    yield text
            row += batch.num_rows
            progress.update(round(bytes_per_row * batch.num_rows))
    except (OSError, pa.ArrowException) as exc:  # a damaged page past the schema check_corpus_file read
        raise UsageError(f"{path} is not a readable Parquet file (after row {row}): {first_line(exc)}") from exc


def _local_documents(files: list[Path], data: LocalData, bad: BadLines) -> Iterator[str]:
    with tqdm(total=sum(path.stat().st_size for path in files), unit="B", unit_scale=True, desc="Reading",
              disable=not is_main_process()) as progress:
        for path in files:
            before = bad.count
            if path.suffix == ".txt":
                yield from _txt_documents(path, data.txt_split, bad, progress)
            elif path.suffix == ".jsonl":
                yield from _jsonl_documents(path, data.text_field, bad, progress)
            else:
                yield from _parquet_documents(path, data.text_field, bad, progress)
            if bad.count > before:
                log.warning("%s: skipped %d bad line(s)", path, bad.count - before)


def write_text_arrow(documents: Iterable[str], path: Path) -> None:
    """Stream documents into an Arrow file that `datasets` memory-maps, a record batch at a time."""
    schema = pa.schema([("text", pa.string())])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        batch: list[str] = []
        chars = 0
        for text in documents:
            batch.append(text)
            chars += len(text)
            if chars >= _WRITE_CHUNK_CHARS:
                writer.write_batch(pa.record_batch([pa.array(batch, pa.string())], schema=schema))
                batch, chars = [], 0
        writer.write_batch(pa.record_batch([pa.array(batch, pa.string())], schema=schema))



def _hub_corpus(data: HubData, work_dir: Path, bad: BadLines, batch_size: int):
    """The configured hub datasets as one `text` column: memory-mapped Arrow, or streamed into an Arrow file."""
    from datasets import Dataset, concatenate_datasets, load_dataset

    parts = []
    for source in data.datasets:
        label = f"{source.name} ({source.config}, split {source.split})"
        try:
            part = load_dataset(source.name, source.config, split=source.split, revision=source.revision,
                                streaming=data.streaming)
        except Exception as exc:  # offline, unknown name or config, legacy script...: this source cannot be read
            raise UsageError(f"cannot load dataset {label}: {first_line(exc)}") from exc
        if part.column_names is not None and source.text_field not in part.column_names:
            raise UsageError(f"dataset {label} has no column {source.text_field!r} "
                             f"(columns: {', '.join(part.column_names)})")
        part = part.select_columns([source.text_field])
        parts.append(part.rename_column(source.text_field, "text") if source.text_field != "text" else part)
    corpus = concatenate_datasets(parts)
    if data.streaming:
        path = work_dir / "corpus.arrow"
        write_text_arrow(_streamed_texts(corpus, bad, batch_size), path)
        return Dataset.from_file(str(path))
    if missing := corpus.data.column("text").null_count:
        bad.handle("hub datasets", "records without text", count=missing)
    return corpus


def _streamed_texts(corpus, bad: BadLines, batch_size: int) -> Iterator[str]:
    with tqdm(desc="Streaming", unit=" records", disable=not is_main_process()) as progress:
        for batch in corpus.iter(batch_size=batch_size):
            texts = batch["text"]
            if missing := texts.count(None):
                bad.handle("hub datasets (streamed)", "records without text", count=missing)
            yield from (text for text in texts if text is not None)
            progress.update(len(texts))



def read_corpus(data: LocalData | HubData, batch_size: int, files: list[Path], work_dir: Path, bad: BadLines):
    from datasets import Dataset

    if data.source == "hub":
        return _hub_corpus(data, work_dir, bad, batch_size)
    path = work_dir / "corpus.arrow"
    write_text_arrow(_local_documents(files, data, bad), path)
    return Dataset.from_file(str(path))

