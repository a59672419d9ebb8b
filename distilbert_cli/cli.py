"""The `distil` command line: one command per stage, each taking Hydra overrides.

    distil train +experiment=triple_loss loss.temperature=4 run_dir=runs/exp1
    distil train +experiment=triple_loss --cfg          # print the validated config and exit
    accelerate launch -m distilbert_cli train ...       # the same, on several processes

A command composes `conf/<config>.yaml` with the overrides, validates it once and calls its stage's
`run(cfg, overrides)` with the typed config (distilbert_cli.schema).
User mistakes, unreadable files, a stage in use by another process, a full disk and a run directory that cannot be
written print one line to stderr and exit 2; SIGINT (Ctrl-C) or SIGTERM marks the open stage failed, prints one
line and exits 130 (distilbert_cli.processes).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import typer
from omegaconf.errors import MissingMandatoryValue

from distilbert_cli import processes
from distilbert_cli.config import SWEEP_KEYS, compose_config, one_line, renamed_overrides, split_overrides, to_yaml
from distilbert_cli.errors import Interrupted, UsageError, filesystem_problem, first_line, is_disk_full

USAGE_EXIT_CODE = 2
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as shells report a Ctrl-C
StageRun = Callable[[Any, Sequence[str]], object]  # run(the command's typed config, its overrides)


@dataclass(frozen=True)
class StageCommand:
    name: str
    config: str  # primary config in conf/
    stage: Callable[[], StageRun]  # imports the stage module and gives its run(cfg, overrides)
    summary: str
    io: str
    aliases: tuple[str, ...] = ()
    # The top-level keys its config takes (None: all); its stage gets every override (distil sweep's members').
    own_keys: tuple[str, ...] | None = None


# A stage is imported when its command runs, so that `distil --help` and `--cfg` start without torch.
def _prepare_data() -> StageRun:
    from distilbert_cli.stages import prepare_data
    return prepare_data.run


def _init_student() -> StageRun:
    from distilbert_cli.stages import init_student
    return init_student.run


def _train() -> StageRun:
    from distilbert_cli.stages import train
    return train.run


def _finetune() -> StageRun:
    from distilbert_cli.stages import finetune
    return finetune.run


def _task_distill() -> StageRun:
    from distilbert_cli.stages import task_distill
    return task_distill.run


def _evaluate() -> StageRun:
    from distilbert_cli.stages import evaluate
    return evaluate.run


def _bench_cpu() -> StageRun:
    from distilbert_cli.stages import bench_cpu
    return bench_cpu.run


def _export() -> StageRun:
    from distilbert_cli.stages import export
    return export.run


def _publish() -> StageRun:
    from distilbert_cli.stages import publish
    return publish.run


def _report() -> StageRun:
    from distilbert_cli.stages import report
    return report.run


def _sweep() -> StageRun:
    from distilbert_cli.stages import sweep
    return sweep.run


COMMANDS = (
    StageCommand("prepare-data", "prepare_data", _prepare_data,
                 "Tokenize a corpus into the training set, with token counts for masking.",
                 "reads: a corpus (data=...); writes: <run_dir>/prepare-data/"),
    StageCommand("init-student", "init_student", _init_student,
                 "Build the student from the teacher (half its layers, DistilBERT or its own class by default).",
                 "reads: teacher.name_or_path; writes: <run_dir>/init-student/model/"),
    StageCommand("train", "train", _train,
                 "Distill the teacher into the student (the DistilBERT triple loss; +experiment=tinybert_general, "
                 "mobilebert, minilm, minilmv2 for the other methods). Alias: distill.",
                 "reads: prepare-data/, init-student/; writes: <run_dir>/distill/final/", aliases=("distill",)),
    StageCommand("finetune", "finetune", _finetune,
                 "Fine-tune the student (or teacher) on GLUE, IMDb, SQuAD or your own data, several seeds.",
                 "reads: distill/final/ (or any model); writes: <run_dir>/finetune/"),
    StageCommand("task-distill", "task_distill", _task_distill,
                 "Distill a fine-tuned teacher into a student on one task's training set plus augmented copies "
                 "(Tang et al.; TinyBERT's task stage): a transformer or a BiLSTM (init-student student=bilstm).",
                 "reads: finetune/teacher/ (or any fine-tuned model), distill/final/ (or any model); "
                 "writes: <run_dir>/task-distill/"),
    StageCommand("evaluate", "evaluate", _evaluate,
                 "Score fine-tuned models and write the paper's tables (Tables 1 and 2). Alias: eval-glue.",
                 "reads: finetune/; writes: <run_dir>/evaluate/results.md", aliases=("eval-glue",)),
    StageCommand("bench-cpu", "bench_cpu", _bench_cpu,
                 "Time teacher and student inference on CPU (the paper's Table 3).",
                 "reads: teacher and distill/final/; writes: <run_dir>/bench-cpu/results.md"),
    StageCommand("export", "export", _export,
                 "Export models for deployment: PyTorch copy, ONNX fp32, fused, int8, each checked on task rows.",
                 "reads: the run's models (or any); writes: <run_dir>/export/<name>/ (onnx*/, parity.json)"),
    StageCommand("publish", "publish", _publish,
                 "Write each exported model's Hub folder and model card; upload it with publish.dry_run=false.",
                 "reads: export/, the run's stages; writes: <run_dir>/publish/<name>/ (README.md = the card)"),
    StageCommand("report", "report", _report,
                 "Write the run's report: loss curves, validation MLM, downstream and CPU tables vs baselines.",
                 "reads: the run's stages and report.baselines, or a sweep's members; "
                 "writes: <run_dir>/report/report.md"),
    StageCommand("sweep", "sweep", _sweep,
                 "Run sweep.stages for every member of a Hydra sweep (+experiment=triple_loss,no_ce range() choice() "
                 "glob()), locally, as submitit jobs or on SLURM, sharing the run's complete stages; then the report.",
                 "reads: <run_dir>'s complete stages (prepare-data, ...); writes: <run_dir>/sweep/<member>/",
                 own_keys=SWEEP_KEYS),
)

app = typer.Typer(
    name="distil",
    help="Distill an encoder teacher (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, DeBERTa-v2/v3, ModernBERT, DistilBERT) "
    "into a smaller student the DistilBERT way, one stage per command. "
    "Every command takes Hydra overrides (key=value, +experiment=NAME, group=option) and --cfg; "
    "a leading bare path is short for run_dir=PATH (distil report runs/exp1).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_OVERRIDES = typer.Argument(None, help="Hydra overrides, e.g. run_dir=runs/exp1 +experiment=triple_loss; "
                            "a leading bare path is short for run_dir=PATH", show_default=False)
_SHOW_CFG = typer.Option(False, "--cfg", help="Print the composed and validated config and exit.")


def expand_run_dir(overrides: list[str]) -> list[str]:
    """`distil report runs/exp1 ...` means `distil report run_dir=runs/exp1 ...`."""
    if overrides and "=" not in overrides[0] and not overrides[0].startswith(("+", "~")):
        return [f"run_dir={overrides[0]}", *overrides[1:]]
    return overrides


def fail(message: str, code: int = USAGE_EXIT_CODE) -> typer.Exit:
    """One `error:` line, whatever the message quotes (a file name or a field with a line break in it)."""
    typer.echo("error: " + message.replace("\r", "\\r").replace("\n", "\\n"), err=True)
    return typer.Exit(code)


def without_local_rank(arguments: list[str]) -> list[str]:
    """The arguments less the `--local_rank=N` an old `torch.distributed.launch` appends (ranks read LOCAL_RANK)."""
    return [a for a in arguments if not a.startswith(("--local_rank=", "--local-rank="))]


def _make_command(spec: StageCommand):
    def command(overrides: list[str] | None = _OVERRIDES, show_cfg: bool = _SHOW_CFG) -> None:
        overrides, notes = renamed_overrides(expand_run_dir(without_local_rank(list(overrides or []))))
        for note in notes:
            typer.echo(f"note: {note}", err=True)
        own = overrides if spec.own_keys is None else split_overrides(overrides, spec.own_keys)[0]
        with processes.interrupts_as_errors():
            try:
                cfg = compose_config(spec.config, own)
                if show_cfg:
                    typer.echo(to_yaml(cfg), nl=False)
                    return
                from distilbert_cli.logs import setup_console_logging

                setup_console_logging()
                spec.stage()(cfg, overrides)
            except Interrupted as exc:  # open_stage marked its stage failed and says which
                raise fail(exc.message(), INTERRUPTED_EXIT_CODE) from None
            except KeyboardInterrupt:
                raise fail(Interrupted("SIGINT").message(), INTERRUPTED_EXIT_CODE) from None
            except UsageError as exc:
                raise fail(str(exc)) from None
            except MissingMandatoryValue as exc:
                raise fail(f"missing required config value: {one_line(exc)}") from None
            except Exception as exc:  # outside a stage's folder (open_stage reports what happens inside it)
                if (signal_name := processes.received()) is not None:  # a library turned the interrupt into its own
                    raise fail(Interrupted(signal_name).message(), INTERRUPTED_EXIT_CODE) from None
                if is_disk_full(exc):
                    raise fail(f"distil {spec.name} ran out of disk space ({first_line(exc)})") from None
                if (problem := filesystem_problem(exc)) is not None:
                    raise fail(f"distil {spec.name} cannot go on: {problem}") from None
                raise

    command.__doc__ = f"{spec.summary}\n\n{spec.io}. Primary config: conf/{spec.config}.yaml."
    return command


_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}
for _spec in COMMANDS:
    app.command(_spec.name, context_settings=_CONTEXT)(_make_command(_spec))
    for _alias in _spec.aliases:
        app.command(_alias, context_settings=_CONTEXT, help=f"Alias of {_spec.name}.")(_make_command(_spec))


def main() -> None:
    app(prog_name="distil")


if __name__ == "__main__":
    sys.exit(main())
