"""export: every variant runs in ONNX Runtime and matches PyTorch within stated tolerances (each family and head,
the BiLSTM), fused ops where the family has fusions, int8 smaller on disk, the PyTorch copy loads in a pipeline,
parity and its int8 gate; bench-cpu times the exported graphs without exporting again; publish: the card parses,
its model-index equals the run's results (a planted wrong figure fails), a dry run lists exactly the folder's
files, an offline upload is one line and exit 2. No test here asserts on a measured time."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from builders import GLUE_DIR, SQUAD_DIR, TINY_TEACHERS, build_tiny_bert, write_corpus
from typer.testing import CliRunner

from distilbert_cli import artifacts
from distilbert_cli.cli import app
from distilbert_cli.config import compose_config
from distilbert_cli.deploy import onnx_models, parity
from distilbert_cli.deploy.card import check_card
from distilbert_cli.rundir import Run, read_manifest
from distilbert_cli.stages import bench_cpu, export, publish

runner = CliRunner()
# Tolerances against PyTorch fp32: the fp32 graphs differ by float rounding only; int8 by its quantisation.
FP32_ATOL, INT8_ATOL = 1e-4, 0.1
SST2 = ["task.names=[sst2]", f"task.data_dir={GLUE_DIR}", "task.max_seq_length=48"]


def distil(*args: str) -> None:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def finetuned_run(tmp_path_factory):
    """A distilled 2-layer student of a tiny BERT, fine-tuned on the SST-2 fixture (labels alone), evaluated, and a
    BiLSTM in a run of its own; the student's fine-tuned model exported in the main run."""
    root = tmp_path_factory.mktemp("export")
    teacher = build_tiny_bert(root / "teacher", num_layers=4, hidden_size=64)
    corpus = write_corpus(root / "corpus.txt")
    run, lstm = root / "run", root / "lstm"
    distil("prepare-data", f"run_dir={run}", f"teacher.name_or_path={teacher}", "data=local", f"data.paths=[{corpus}]",
           "prepare.validation_size=12", "prepare.num_proc=1", "prepare.max_seq_length=48")
    distil("init-student", f"run_dir={run}", f"teacher.name_or_path={teacher}", "student.num_layers=2")
    distil("train", f"run_dir={run}", "+experiment=triple_loss", "+debug=tiny")
    finetune = [*SST2, "finetune.epochs=1", "finetune.max_train_samples=32", "finetune.learning_rate=1e-3"]
    distil("finetune", f"run_dir={run}", *finetune)
    distil("evaluate", f"run_dir={run}", *SST2)
    distil("init-student", f"run_dir={lstm}", f"teacher.name_or_path={teacher}", "student=bilstm",
           "student.embedding_size=64", "student.hidden_size=64", "student.classifier_size=32")
    distil("finetune", f"run_dir={lstm}", *finetune)
    student = run / "finetune" / "student" / "sst2" / "seed-56" / "model"
    bilstm = lstm / "finetune" / "student" / "sst2" / "seed-56" / "model"
    distil("export", f"run_dir={run}", *SST2, f"export.models=[sst2:{student},bilstm:{bilstm}]",
           "export.static_int8=true", "export.calibration_samples=16")
    return run, student, bilstm


# ---- export: the variants, their graphs and their parity -----------------------------------------------------

def test_every_variant_of_each_model_runs_and_matches_pytorch(finetuned_run):
    run, student, _ = finetuned_run
    models = read_manifest(run / "export")["models"]
    assert set(models) == {"sst2", "bilstm"} and models["sst2"]["source"] == str(student)
    for name, facts in models.items():
        folder = artifacts.ExportedModel(run / "export" / name)
        assert set(facts["variants"]) == set(onnx_models.VARIANTS)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

        model = AutoModelForSequenceClassification.from_pretrained(folder.path).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder.path)
        batch = tokenizer(["the film was great", "a bad movie about the war in the city"], padding=True,
                          return_tensors="np")
        feed = {name: batch[name].astype(np.int64) for name in facts["inputs"]}
        with torch.no_grad():
            expected = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
        for variant in onnx_models.VARIANTS:
            got = onnx_models.OnnxModel(folder.variant(variant))(feed)["logits"]
            np.testing.assert_allclose(got, expected, atol=INT8_ATOL if "int8" in variant else FP32_ATOL)
        sizes = {variant: folder.variant(variant).stat().st_size for variant in onnx_models.VARIANTS}
        assert sizes["onnx_int8"] < sizes["onnx"] and sizes["onnx_int8_static"] < sizes["onnx"], sizes
        if name == "sst2":  # the BiLSTM's two texts share each LSTM: ONNX Runtime quantizes one of the two uses
            assert sizes["onnx_int8"] < 0.5 * sizes["onnx"], sizes
        # parity.json's PyTorch reference ran after the export, in eval mode as the graphs were exported (a wrapper
        # that an exporter puts back in training mode would switch dropout on in the model it wraps).
        checked = json.loads(folder.parity.read_text())
        for variant in ("onnx", "onnx_optimized"):
            assert checked["variants"][variant]["max_abs_diff"] < FP32_ATOL, (name, variant, checked["variants"])
        labels = pipeline("text-classification", model=str(folder.path))(["the film was great"])
        assert labels[0]["label"] in model.config.id2label.values()
    # The BERT-family student is fused; the BiLSTM has no fusions (left unfused, with a note), and torch.export
    # cannot capture it, so it was traced.
    fused = onnx_models.graph_op_types(artifacts.ExportedModel(run / "export" / "sst2").variant("onnx_optimized"))
    assert {"Attention", "SkipLayerNormalization", "BiasGelu"} <= fused, fused
    fused_ops = models["sst2"]["variants"]["onnx_optimized"]["fused_ops"]
    assert (fused_ops["Attention"], fused_ops["SkipLayerNormalization"]) == (2, 4)  # per layer: 1 and 2
    assert "dynamo" in models["sst2"]["variants"]["onnx"]["how"]
    assert "TorchScript" in models["bilstm"]["variants"]["onnx"]["how"]
    assert "left unfused" in models["bilstm"]["variants"]["onnx_optimized"]["note"]
    assert {"DynamicQuantizeLinear", "QAttention"} <= onnx_models.graph_op_types(
        artifacts.ExportedModel(run / "export" / "sst2").variant("onnx_int8"))
    assert "QuantizeLinear" in onnx_models.graph_op_types(
        artifacts.ExportedModel(run / "export" / "sst2").variant("onnx_int8_static"))


def test_parity_is_the_variants_own_metric_on_every_dev_row(finetuned_run):
    """parity.json's figures recomputed independently: each variant's predictions on the 64 SST-2 dev rows, their
    accuracy and their agreement with PyTorch's."""
    run, _, _ = finetuned_run
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = artifacts.ExportedModel(run / "export" / "sst2")
    checked = json.loads(folder.parity.read_text())
    rows = [line.rstrip("\n").split("\t") for line in (GLUE_DIR / "SST-2" / "dev.tsv").open()][1:]
    texts, gold = [text for text, _ in rows], np.array([int(label) for _, label in rows])
    tokenizer = AutoTokenizer.from_pretrained(folder.path)
    batch = tokenizer(texts, truncation=True, max_length=48, padding=True, return_tensors="np")
    feed = {name: batch[name].astype(np.int64) for name in ("input_ids", "attention_mask")}
    with torch.no_grad():
        reference = AutoModelForSequenceClassification.from_pretrained(folder.path).eval()(
            **{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy().argmax(-1)
    assert checked["examples"] == len(texts) == 64 and checked["metric"] == "accuracy"
    assert checked["pytorch"]["metric"] == pytest.approx(100 * (reference == gold).mean())
    for variant, entry in checked["variants"].items():
        predicted = onnx_models.OnnxModel(folder.variant(variant))(feed)["logits"].argmax(-1)
        assert entry["metric"] == pytest.approx(100 * (predicted == gold).mean())
        assert entry["agreement"] == pytest.approx(100 * (predicted == reference).mean())
        assert entry["metric_drop"] == pytest.approx(checked["pytorch"]["metric"] - entry["metric"])
        assert entry["status"] == ("not_recommended" if entry["metric_drop"] > 1.0 else "ok")


def test_a_variant_more_than_max_metric_drop_below_pytorch_is_not_recommended():
    """The gate on hand-made outputs: 4 dev rows, PyTorch right on all, a variant wrong on one (-25 points)."""
    from datasets import Dataset

    from distilbert_cli.tasks import get_task

    task = get_task("sst2")
    examples = Dataset.from_dict({"sentence1": ["a", "b", "c", "d"], "label": [0, 1, 1, 0]})
    batches = [{"input_ids": np.ones((4, 3), np.int64), "attention_mask": np.ones((4, 3), np.int64)}]
    rows = parity.DevRows(task, "dev", examples, examples, batches)
    right = [{"logits": np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])}]
    one_wrong = [{"logits": np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.5], [1.0, 0.0]])}]
    checked = parity.parity("text-classification", rows, right, {"onnx": right, "onnx_int8": one_wrong},
                            compose_config("export").task, max_metric_drop=1.0)
    assert checked["pytorch"]["metric"] == 100.0
    assert checked["variants"]["onnx"] | {} == {**checked["variants"]["onnx"], "status": "ok", "metric_drop": 0.0}
    int8 = checked["variants"]["onnx_int8"]
    assert (int8["metric"], int8["metric_drop"], int8["agreement"], int8["status"]) == (75.0, 25.0, 75.0,
                                                                                        "not_recommended")
    assert int8["max_abs_diff"] == pytest.approx(1.0)  # |1.0 - 0.0| at row 3, class 0
    assert parity.recommended(checked) == ["onnx"]


@pytest.mark.parametrize("family", ["bert", "roberta", "electra", "deberta-v2", "modernbert", "distilbert"])
def test_each_family_and_head_exports_and_matches_pytorch(tmp_path, family):
    """Question answering (SQuAD fixture) and masked LM heads of each family's tiny model: every variant within
    tolerance of PyTorch, every layer's attention and layer norms fused where the family has fusions."""
    from transformers import AutoConfig, AutoModelForQuestionAnswering

    from distilbert_cli.models.families import find_family

    base = TINY_TEACHERS[family](tmp_path / "base", num_layers=2)
    qa_dir = tmp_path / "qa"
    AutoModelForQuestionAnswering.from_pretrained(base).save_pretrained(qa_dir)
    AutoConfig.from_pretrained(base)  # the tokenizer travels with the base model
    for file in base.iterdir():
        if "token" in file.name or file.name in ("vocab.txt", "special_tokens_map.json", "merges.txt", "spm.model"):
            (qa_dir / file.name).write_bytes(file.read_bytes())
    cfg = compose_config("export", [f"run_dir={tmp_path / 'run'}", "task=squad", f"task.data_dir={SQUAD_DIR}",
                                    "task.qa.max_seq_length=64", "task.qa.doc_stride=32", "task.qa.max_query_length=16",
                                    f"export.models=[qa:{qa_dir},mlm:{base}]", "export.parity_samples=6"])
    models = export.run(cfg)
    assert (models["qa"]["export_task"], models["mlm"]["export_task"]) == ("question-answering", "fill-mask")
    fusions = find_family(AutoConfig.from_pretrained(base)).onnx_fusions
    for name, facts in models.items():
        checked = json.loads(artifacts.ExportedModel(tmp_path / "run" / "export" / name).parity.read_text())
        for variant, entry in checked["variants"].items():
            limit = INT8_ATOL if "int8" in variant else FP32_ATOL
            assert entry["max_abs_diff"] < limit, (family, name, variant, entry)
            if "int8" not in variant:
                assert entry["agreement"] == 100.0, (family, name, variant, entry)
        fused = facts["variants"]["onnx_optimized"]["fused_ops"]
        expected = (2, 4) if fusions else (0, 0)  # per layer: one Attention, two SkipLayerNormalization
        assert (fused.get("Attention", 0), fused.get("SkipLayerNormalization", 0)) == expected, (family, name, fused)
    qa = json.loads(artifacts.ExportedModel(tmp_path / "run" / "export" / "qa").parity.read_text())
    assert qa["metric"] == "exact_match / f1" and qa["examples"] == 6


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_fused_attention_honours_any_mask_not_only_right_padding(tmp_path, family):
    """The fused Attention reads the 2-D mask itself: a row whose mask has a hole in the middle (which a length per
    row cannot express) matches PyTorch. Query and key weights are scaled up so that attention is sharp enough for
    the masked positions to move the outputs."""
    from transformers import AutoModel, AutoTokenizer

    base = TINY_TEACHERS[family](tmp_path / "base", num_layers=2)
    model = AutoModel.from_pretrained(base, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part in name for part in ("query.weight", "key.weight", "q_lin.weight", "k_lin.weight")):
                parameter.mul_(8.0)
    names = onnx_models.model_input_names(model, tokenizer)
    rows = [tokenizer("the film was great and the actors were good", "a long second text"), tokenizer("short")]
    rows = [{name: row[name] for name in names} for row in rows]
    graphs = onnx_models.build_variants(model, onnx_models.export_sample(rows, names, tokenizer.pad_token_id),
                                        tmp_path / "graphs", ["onnx", "onnx_optimized"], per_channel=False)
    assert graphs["onnx_optimized"].fused_ops["Attention"] == 2
    batch = onnx_models.pad_batch(rows, names, tokenizer.pad_token_id)
    batch["attention_mask"][0, 2:5] = 0
    with torch.no_grad():
        expected = model(**{name: torch.from_numpy(array) for name, array in batch.items()}).last_hidden_state.numpy()
    for variant, graph in graphs.items():
        got = onnx_models.OnnxModel(graph.path)(batch)["last_hidden_state"]
        np.testing.assert_allclose(got, expected, atol=FP32_ATOL, err_msg=variant)


def test_feature_extraction_of_any_checkpoint_and_of_a_bilstm_encoder(finetuned_run, tmp_path):
    """A plain encoder (BERT's, and the BiLSTM that init-student saves): no task metric, the variants' sentence
    vectors against PyTorch's."""
    run, _, bilstm = finetuned_run
    base = build_tiny_bert(tmp_path / "base", num_layers=1)
    encoder = bilstm.parents[4] / "init-student" / "model"
    models = export.run(compose_config("export", [f"run_dir={tmp_path / 'run'}", *SST2, "export.parity_samples=8",
                                                  f"export.models=[enc:{base},lstm:{encoder}]",
                                                  "export.task=feature-extraction"]))
    assert (models["enc"]["architecture"], models["lstm"]["architecture"]) == ("BertModel", "BiLSTMModel")
    for name in ("enc", "lstm"):
        checked = json.loads(artifacts.ExportedModel(tmp_path / "run" / "export" / name).parity.read_text())
        assert checked["metric"] is None and checked["outputs"][:2] == ["last_hidden_state", "pooler_output"]
        for variant in ("onnx", "onnx_optimized"):
            assert checked["variants"][variant]["agreement"] == pytest.approx(1.0, abs=1e-6)  # cosine
        assert all(entry["status"] == "unchecked" for entry in checked["variants"].values())


# ---- bench-cpu reads the exported graphs -------------------------------------------------------------------

def test_bench_cpu_times_the_exported_variants_without_exporting_again(finetuned_run, monkeypatch):
    run, student, _ = finetuned_run

    def no_second_export(*args, **kwargs):
        raise AssertionError("bench-cpu exported a model the export stage has")

    monkeypatch.setattr(onnx_models, "build_variants", no_second_export)
    cfg = compose_config("bench_cpu", [f"run_dir={run}", *SST2, f"bench.models=[sst2:{student}]",
                                       "bench.backends=[eager,onnx,onnx_optimized,onnx_int8]", "bench.max_examples=6",
                                       "bench.num_threads=1", "bench.repeats=1", "bench.warmup_batches=1",
                                       "bench.check_examples=6", "overwrite=true"])
    results = bench_cpu.run(cfg)
    rows = {row["backend"]: row for row in results["results"]}
    assert all(row["status"] == "ok" for row in rows.values()), rows
    for backend in ("onnx", "onnx_optimized", "onnx_int8"):
        assert rows[backend]["artifact"].endswith("(export stage)")
        assert rows[backend]["size_on_disk_bytes"] == artifacts.ExportedModel(
            run / "export" / "sst2").variant(backend).stat().st_size
    assert results["models"][0]["deployed_as"].startswith("export/sst2 (its own 2-output head")
    assert "export" in {entry.get("stage") for entry in read_manifest(run / "bench-cpu")["inputs"]}


# ---- publish: the card and the folder ---------------------------------------------------------------------------

def test_publish_dry_run_lists_the_folder_and_the_card_holds_the_runs_figures(finetuned_run, caplog):
    from huggingface_hub import ModelCard

    run, student, _ = finetuned_run
    cfg = compose_config("publish", [f"run_dir={run}", "publish.repo_id='me/distil-{name}'", "overwrite=true"])
    with caplog.at_level(logging.INFO, logger="distilbert_cli.stages.publish"):
        published = publish.run(cfg)
    for name in ("sst2", "bilstm"):
        folder = run / "publish" / name
        on_disk = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        assert published[name]["files"] == on_disk and published[name]["pushed"] is None
        assert "README.md" in on_disk and "onnx_int8/model.onnx" in on_disk or "onnx_int8" in json.loads(
            (folder / "parity.json").read_text())["variants"]
        listed = next(r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{name}: "))
        assert f"would be uploaded to me/distil-{name}" in listed
        assert [line.split("  (")[0].strip() for line in listed.splitlines()[1:]] == on_disk
    manifest = read_manifest(run / "publish")
    assert manifest["status"] == "complete" and manifest["dry_run"] and manifest["pushed"] == {}

    card = ModelCard.load(run / "publish" / "sst2" / "README.md")
    seed_metrics = json.loads((student.parent / "metrics.json").read_text())["metrics"]
    (result,) = card.data.eval_results
    assert (result.metric_type, result.metric_value) == ("accuracy", round(seed_metrics["accuracy"], 2))
    assert (result.dataset_type, result.dataset_split) == ("sst2", "dev")  # local files: the task's name
    assert card.data.pipeline_tag == "text-classification" and "distillation" in card.data.tags
    parity_json = json.loads((run / "export" / "sst2" / "parity.json").read_text())
    assert f"| onnx_int8 | {parity_json['variants']['onnx_int8']['max_abs_diff']:.2e} |" in card.text
    validation = json.loads((run / "distill" / "validation.json").read_text())
    assert f"student loss {validation['student']['mlm_loss']:.3f}" in card.text
    init = read_manifest(run / "init-student")
    assert f"teacher layers {init['layer_map']}" in card.text
    assert "distil finetune " in card.text and "@article{sanh2019distilbert" in card.text


def test_a_planted_wrong_figure_fails_the_card_check(finetuned_run, tmp_path):
    run, _, _ = finetuned_run
    card = run / "publish" / "sst2" / "README.md"
    if not card.exists():
        publish.run(compose_config("publish", [f"run_dir={run}", "publish.models=[sst2]", "overwrite=true"]))
    check_card(card, "sst2", Run(run))  # as written: passes
    text = card.read_text()
    value = next(line.split(":")[1].strip() for line in text.splitlines() if line.strip().startswith("value:"))
    planted = tmp_path / "README.md"
    planted.write_text(text.replace(f"value: {value}", f"value: {float(value) + 0.5}", 1))
    with pytest.raises(Exception, match="model-index says accuracy"):
        check_card(planted, "sst2", Run(run))


def test_an_offline_upload_is_one_line_and_exit_2_and_nothing_says_pushed(finetuned_run):
    run, _, _ = finetuned_run
    result = runner.invoke(app, ["publish", f"run_dir={run}", "publish.models=[sst2]", "publish.repo_id=me/x",
                                 "publish.dry_run=false", "overwrite=true"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "cannot upload" in lines[0] and "me/x" in lines[0], result.output
    assert "Traceback" not in result.output
    manifest = read_manifest(run / "publish")
    assert manifest["status"] == "failed" and not manifest.get("pushed")


@pytest.mark.parametrize(("command", "overrides", "message"), [
    ("export", ["export.models=[..:/tmp]"],
     "export.models=['..:/tmp']: entry '..:/tmp' is stored by the name '..', which cannot be a folder"),
    ("export", ["export.task=onnx"], "export.task='onnx': input should be"),
    ("publish", ["publish.dry_run=false"], "publish.dry_run=false uploads to publish.repo_id"),
    ("publish", [], "input stage export not found"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, command, overrides, message):
    result = runner.invoke(app, [command, f"run_dir={tmp_path / 'run'}", *overrides])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
