"""`distil prepare-data`: sources, chunking, filters, token counts, determinism and bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import tiny_vocab
from transformers import AutoTokenizer

from distilbert_cli.artifacts import PreparedData
from distilbert_cli.config import compose_config
from distilbert_cli.data.prepared import load_prepared
from distilbert_cli.errors import UsageError
from distilbert_cli.rundir import read_manifest
from distilbert_cli.stages import prepare_data

WORDS = tiny_vocab()[tiny_vocab().index("the"):tiny_vocab().index("#")]  # one token each in the tiny vocab
CLS, SEP, UNK = 2, 3, 1


def sentence(count: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(count))


def prepare(run_dir, teacher, *overrides):
    cfg = compose_config("prepare_data", ["data=local", f"teacher.name_or_path={teacher}", f"run_dir={run_dir}",
                                          "prepare.max_seq_length=128", "prepare.num_proc=1", *overrides])
    return prepare_data.run(cfg, list(overrides))


def prepared(run_dir):
    """The (dataset, token counts) prepare-data wrote into `run_dir`."""
    return load_prepared(PreparedData(run_dir / "prepare-data"))


def all_sequences(dataset) -> list[list[int]]:
    return [ids for split in ("train", "validation") for ids in dataset[split]["input_ids"]]


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher):
    return AutoTokenizer.from_pretrained(tiny_teacher)


@pytest.fixture(scope="module")
def wide_teacher(tiny_teacher, tmp_path_factory):
    """The tiny teacher's tokenizer, declared for 512 positions (BERT's) so 512-token sequences are allowed."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    tokenizer.model_max_length = 512
    directory = tmp_path_factory.mktemp("wide-teacher")
    tokenizer.save_pretrained(directory)
    return directory


# ------------------------------------------------------------------------------------------ end to end


def test_txt_corpus_gives_framed_sequences_counts_and_contract(tmp_path, run_dir, tiny_teacher, tokenizer):
    texts = [sentence(20, offset) for offset in range(40)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n\n   \n")  # blank lines are not documents
    stage_dir = prepare(run_dir, tiny_teacher, f"data.paths=[{corpus}]", "prepare.validation_size=4")

    dataset, counts = prepared(run_dir)
    assert set(dataset) == {"train", "validation"} and dataset["validation"].num_rows == 4
    expected = {tuple([CLS, *tokenizer(text, add_special_tokens=False)["input_ids"], SEP]) for text in texts}
    assert {tuple(ids) for ids in all_sequences(dataset)} == expected
    for split in dataset.values():
        assert split["length"] == [len(ids) for ids in split["input_ids"]]
    train_ids = np.concatenate([np.asarray(ids) for ids in dataset["train"]["input_ids"]])
    assert counts.dtype == np.int64 and counts.shape == (len(tokenizer),)
    assert counts.sum() == len(train_ids) == sum(dataset["train"]["length"])
    np.testing.assert_array_equal(counts, np.bincount(train_ids, minlength=len(tokenizer)))
    assert counts[CLS] == counts[SEP] == dataset["train"].num_rows

    stats = json.loads((stage_dir / "stats.json").read_text())
    assert stats["documents_read"] == 40
    assert stats["sequences_written"] == {"train": 36, "validation": 4, "total": 40}
    assert stats["tokens_written"]["total"] == 40 * 22 and stats["tokens_written"]["train"] == counts.sum()
    assert stats["length_histogram"]["counts"][stats["length_histogram"]["bin_edges"].index(16)] == 40
    assert stats["bad_lines"]["policy"] == "skip"
    # of what was written; "seconds" is rounded to the millisecond, so the rate lies between the two rounding bounds
    seconds, half_ms = stats["seconds"], 5e-4
    assert 40 * 22 / (seconds + half_ms) - 0.05 <= stats["tokens_per_second"] <= (
        40 * 22 / max(seconds - half_ms, 1e-9) + 0.05)
    manifest = read_manifest(stage_dir)
    assert manifest["status"] == "complete"
    assert (manifest["tokenizer"], manifest["vocab_size"], manifest["max_seq_length"]) == (
        str(tiny_teacher), len(tokenizer), 128)
    assert AutoTokenizer.from_pretrained(stage_dir / "tokenizer").get_vocab() == tokenizer.get_vocab()
    assert not (stage_dir / ".tmp-work").exists()


def test_a_1100_token_document_is_cut_into_512_token_chunks(tmp_path, run_dir, wide_teacher, tokenizer):
    long_text, exact_text = sentence(1100), sentence(510, offset=3)
    corpus = tmp_path / "long.txt"
    corpus.write_text(f"{long_text}\n{exact_text}\n")
    prepare(run_dir, wide_teacher, f"data.paths=[{corpus}]", "prepare.max_seq_length=512", "prepare.validation_size=1")

    ids = tokenizer(long_text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1100
    expected = [[CLS, *ids[:510], SEP], [CLS, *ids[510:1020], SEP], [CLS, *ids[1020:], SEP],
                [CLS, *tokenizer(exact_text, add_special_tokens=False)["input_ids"], SEP]]
    sequences = all_sequences(prepared(run_dir)[0])
    assert sorted(sequences) == sorted(expected)
    assert sorted(map(len, sequences)) == [82, 512, 512, 512]


def test_filters_drop_short_and_mostly_unknown_sequences(tmp_path, run_dir, tiny_teacher):
    documents = [
        sentence(10),                        # 12 tokens with [CLS]/[SEP]: kept
        sentence(9),                         # 11 tokens: too short (the reference drops <= 11)
        "中 中 中 中 中 中 " + sentence(4),     # 6 [UNK] of 12 tokens, exactly half: dropped
        "中 中 中 中 中 " + sentence(5),        # 5 [UNK] of 12: kept
        "\u200b",                            # deleted by the normalizer: no token at all
    ]
    corpus = tmp_path / "filters.txt"
    corpus.write_text("\n".join(documents) + "\n")
    stats = json.loads((prepare(run_dir, tiny_teacher, f"data.paths=[{corpus}]", "prepare.validation_size=1")
                        / "stats.json").read_text())
    assert stats["documents_read"] == 5
    assert stats["sequences_written"]["total"] == 2
    assert {name: (d["count"], d["tokens"]) for name, d in stats["dropped"].items()} == {
        "empty_documents": (1, 0), "too_short": (1, 11), "mostly_unknown": (1, 12)}

    relaxed = prepare(tmp_path / "relaxed", tiny_teacher, f"data.paths=[{corpus}]", "prepare.validation_size=1",
                      "prepare.min_seq_length=11", "prepare.max_unk_fraction=0.6")
    assert json.loads((relaxed / "stats.json").read_text())["sequences_written"]["total"] == 4


def test_pack_fills_sequences_with_whole_short_documents(tmp_path, run_dir, tiny_teacher):
    corpus = tmp_path / "short.txt"
    corpus.write_text("".join(sentence(10, offset) + "\n" for offset in range(30)))
    prepare(run_dir, tiny_teacher, f"data.paths=[{corpus}]", "prepare.max_seq_length=64", "prepare.pack=true",
            "prepare.validation_size=1")
    sequences = all_sequences(prepared(run_dir)[0])
    # Each document adds 10 tokens + [SEP]: five fit after [CLS] in 64 (1 + 5 * 11 = 56), so 30 make 6 sequences.
    assert sorted(map(len, sequences)) == [56] * 6
    assert all(ids[0] == CLS and ids.count(SEP) == 5 and ids[-1] == SEP for ids in sequences)


def test_jsonl_parquet_blank_line_txt_directories_and_globs(tmp_path, run_dir, tiny_teacher, tokenizer):
    folder = tmp_path / "corpus"
    (folder / "nested").mkdir(parents=True)
    (folder / "a.jsonl").write_text(json.dumps({"body": sentence(15)}) + "\n" + json.dumps({"body": sentence(16)})
                                    + "\n")
    pq.write_table(pa.table({"body": [sentence(17), sentence(18), sentence(19)]}), folder / "nested" / "b.parquet")
    (folder / "c.txt").write_text(f"{sentence(7)}\n{sentence(8, 1)}\n\n\n{sentence(20)}\n")
    (folder / "notes.md").write_text("not part of the corpus\n")

    stage_dir = prepare(run_dir, tiny_teacher, f"data.paths=[{folder}]", "data.text_field=body",
                        "data.txt_split=blank_line", "prepare.validation_size=1")
    stats = json.loads((stage_dir / "stats.json").read_text())
    assert stats["documents_read"] == 2 + 3 + 2
    paragraph = tokenizer(f"{sentence(7)}\n{sentence(8, 1)}", add_special_tokens=False)["input_ids"]
    assert [CLS, *paragraph, SEP] in all_sequences(prepared(run_dir)[0])
    assert {entry["role"] for entry in read_manifest(stage_dir)["inputs"]} == {"tokenizer", "corpus"}

    glob_dir = prepare(tmp_path / "glob", tiny_teacher, f"data.paths=['{folder}/**/*.parquet']",
                       "data.text_field=body", "prepare.validation_size=1")
    assert json.loads((glob_dir / "stats.json").read_text())["documents_read"] == 3


def test_same_seed_same_output_whatever_the_processes(tmp_path, tiny_teacher):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(sentence(12 + offset % 50, offset) + "\n" for offset in range(300)))
    runs = [prepare(tmp_path / name, tiny_teacher, f"data.paths=[{corpus}]", *extra) for name, extra in
            [("a", []), ("b", ["prepare.num_proc=2", "prepare.batch_size=7"]), ("c", ["seed=1"])]]
    (a, counts_a), (b, counts_b), (c, _) = (prepared(stage.parent) for stage in runs)
    for split in ("train", "validation"):
        assert a[split]["input_ids"] == b[split]["input_ids"]
    np.testing.assert_array_equal(counts_a, counts_b)
    assert a["validation"]["input_ids"] != c["validation"]["input_ids"]


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_source_concatenates_datasets_by_name(tmp_path, run_dir, tiny_teacher, monkeypatch, streaming):
    """The `load_dataset(name, config, split=...)` path, offline: a local dataset folder stands in for a hub name."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    (tmp_path / "wiki").mkdir()
    (tmp_path / "books").mkdir()
    pq.write_table(pa.table({"body": [sentence(20, offset) for offset in range(5)], "id": list(range(5))}),
                   tmp_path / "wiki" / "train.parquet")
    (tmp_path / "books" / "train.jsonl").write_text("".join(json.dumps({"text": sentence(30, offset)}) + "\n"
                                                            for offset in range(4)))
    sources = ",".join(f"{{name:{tmp_path / name},config:null,split:train,revision:null,text_field:{field}}}"
                       for name, field in [("wiki", "body"), ("books", "text")])
    cfg = compose_config("prepare_data", [f"teacher.name_or_path={tiny_teacher}", f"run_dir={run_dir}",
                                          "prepare.max_seq_length=128", "prepare.num_proc=1",
                                          "prepare.validation_size=1", f"data.streaming={str(streaming).lower()}",
                                          f"data.datasets=[{sources}]"])
    stats = json.loads((prepare_data.run(cfg) / "stats.json").read_text())
    assert stats["source"] == "hub" and stats["documents_read"] == 9
    assert stats["tokens_written"]["total"] == 5 * 22 + 4 * 32
    assert [entry["role"] for entry in read_manifest(run_dir / "prepare-data")["inputs"]] == [
        "tokenizer", "corpus", "corpus"]


# ------------------------------------------------------------------------------------------ bad inputs


def _assert_fails(run_dir, teacher, message, *overrides):
    with pytest.raises(UsageError, match=message):
        prepare(run_dir, teacher, *overrides)
    manifest = read_manifest(run_dir / "prepare-data")
    assert manifest is None or manifest["status"] != "complete"


def test_missing_empty_and_unsupported_paths(tmp_path, run_dir, tiny_teacher):
    _assert_fails(run_dir, tiny_teacher, "corpus path not found", f"data.paths=[{tmp_path / 'nope.txt'}]")
    _assert_fails(run_dir, tiny_teacher, "no .txt, .jsonl, .parquet files match", f"data.paths=['{tmp_path}/*.txt']")
    (tmp_path / "empty.txt").write_text("\n  \n")
    _assert_fails(run_dir, tiny_teacher, "empty corpus", f"data.paths=[{tmp_path / 'empty.txt'}]")
    (tmp_path / "table.csv").write_text("a,b\n")
    _assert_fails(run_dir, tiny_teacher, "unsupported corpus file", f"data.paths=[{tmp_path / 'table.csv'}]")


def test_binary_and_wrong_format_files(tmp_path, run_dir, tiny_teacher):
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    _assert_fails(run_dir, tiny_teacher, "not a text file", f"data.paths=[{tmp_path / 'image.txt'}]")
    (tmp_path / "fake.parquet").write_text("not parquet")
    _assert_fails(run_dir, tiny_teacher, "not a readable Parquet file", f"data.paths=[{tmp_path / 'fake.parquet'}]")
    (tmp_path / "records.jsonl").write_text(json.dumps({"content": sentence(20)}) + "\n")
    _assert_fails(run_dir, tiny_teacher, "no field 'text'", f"data.paths=[{tmp_path / 'records.jsonl'}]")


def test_invalid_utf8_lines_are_skipped_and_counted_or_fatal(tmp_path, run_dir, tiny_teacher):
    corpus = tmp_path / "mixed.txt"
    corpus.write_bytes(b"".join([sentence(20).encode() + b"\n", b"caf\xe9 latin-1\n", sentence(21).encode() + b"\n",
                                 b"\xff\xfe broken\n", sentence(22).encode() + b"\n"]))
    stats = json.loads((prepare(run_dir, tiny_teacher, f"data.paths=[{corpus}]", "prepare.validation_size=1")
                        / "stats.json").read_text())
    assert stats["bad_lines"]["policy"] == "skip" and stats["bad_lines"]["count"] == 2
    assert stats["documents_read"] == 3
    _assert_fails(tmp_path / "strict", tiny_teacher, r"mixed.txt:2: not valid UTF-8", f"data.paths=[{corpus}]",
                  "data.bad_lines=fail")


def test_unknown_tokenizer_hub_dataset_and_impossible_settings(tmp_path, run_dir, tiny_teacher):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(sentence(20) + "\n" + sentence(30) + "\n")
    paths = f"data.paths=[{corpus}]"
    _assert_fails(run_dir, "./no/such/teacher", "teacher tokenizer directory does not exist", paths)
    _assert_fails(run_dir, "no-such-org/no-such-model", "cannot load teacher tokenizer", paths)
    _assert_fails(run_dir, tiny_teacher, "exceeds the model_max_length 128", paths, "prepare.max_seq_length=512")
    _assert_fails(run_dir, tiny_teacher, "prepare.max_seq_length=2: input should be greater than or equal to 3", paths,
                  "prepare.max_seq_length=2")
    _assert_fails(run_dir, tiny_teacher, "prepare.validation_size=0: input should be greater than 0", paths,
                  "prepare.validation_size=0")
    _assert_fails(run_dir, tiny_teacher, "leaves no training sequences", paths, "prepare.validation_size=2")
    with pytest.raises(UsageError, match="cannot load dataset wikimedia/wikipedia"):  # offline: the hub default
        prepare_data.run(compose_config("prepare_data", [f"teacher.name_or_path={tiny_teacher}", f"run_dir={run_dir}",
                                                         "prepare.max_seq_length=128"]))
    assert read_manifest(run_dir / "prepare-data")["status"] == "failed"


def test_cli_reports_a_bad_corpus_in_one_line_with_exit_code_2(tmp_path, tiny_teacher):
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01\x02" * 100)
    result = subprocess.run([sys.executable, "-m", "distilbert_cli", "prepare-data", "data=local",
                             f"data.paths=[{tmp_path / 'blob.txt'}]", f"teacher.name_or_path={tiny_teacher}",
                             "prepare.max_seq_length=128", f"run_dir={tmp_path / 'run'}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'blob.txt'} is not a text file "
                                                  "(it contains NUL bytes)"]
