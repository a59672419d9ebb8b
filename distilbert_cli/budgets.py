"""The arms of a downstream comparison and how each was trained: every seed's budget (the steps it was given, the
step model selection chose, whether it stopped early, its wall time; finetune's and task-distill's metrics.json),
the model selection its stage was configured with, and the protocol of a comparison in words for its verdict line:
each arm at its own best budget, or at equal steps without model selection."""

from __future__ import annotations

from distilbert_cli import artifacts
from distilbert_cli.artifacts import read_json
from distilbert_cli.rundir import Run

# The config section each training stage's model selection is read from.
SECTIONS = {artifacts.FINETUNE: "finetune", artifacts.TASK_DISTILL: "task_distill"}


def seed_budget(metrics: dict, task: str, seed: int) -> dict:
    """One seed's budget from its metrics.json. A run from before model selection (no `budget`) trained its
    whole budget and kept the last step."""
    steps = metrics["steps"]
    intermediate, prediction = (steps["intermediate"], steps["prediction"]) if isinstance(steps, dict) else (0, steps)
    budget = metrics.get("budget") or {"total_steps": prediction, "trained_steps": prediction,
                                       "chosen_step": prediction, "stopped_early": False, "validation_score": None}
    return {"task": task, "seed": seed, "intermediate_steps": intermediate, "total_steps": budget["total_steps"],
            "trained_steps": budget["trained_steps"], "chosen_step": budget["chosen_step"],
            "stopped_early": budget["stopped_early"],
            "selected": budget["validation_score"] is not None,
            "validation_examples": metrics.get("validation_examples", 0), "train_seconds": metrics.get("train_seconds")}


def arm(run: Run, stage: str, model: str) -> dict | None:
    """Every seed of `model` (per task) that `stage` (finetune, or task-distill's student) of `run` trained, and
    the model selection they were trained with (None: none, the last step's model was kept); None without the
    stage or the model."""
    stage_dir = run.complete(stage)
    if stage_dir is None or not (stage_dir / model).is_dir():
        return None
    seeds = [seed_budget(read_json(found.metrics), task.name, found.seed)
             for task in sorted(path for path in (stage_dir / model).iterdir() if path.is_dir())
             for found in artifacts.finetune_runs(stage_dir, model, task.name)]
    if not seeds:
        return None
    settings = run.manifest(stage)["config"][SECTIONS[stage]]
    selection = None
    if all(seed["selected"] for seed in seeds):
        selection = {"validation_examples": sorted({seed["validation_examples"] for seed in seeds}),
                     "eval_every": settings["eval_every"], "early_stopping": settings["early_stopping"]}
    return {"seeds": seeds, "selection": selection}


def _joined(values) -> str:
    """Distinct values in their order, " / " between them."""
    return " / ".join(dict.fromkeys(str(value) for value in values))


def selection_words(selection: dict) -> str:
    examples = _joined(selection["validation_examples"])
    stopping = (f"early stopping after {selection['early_stopping']}" if selection["early_stopping"] is not None
                else "no early stopping")
    return f"{examples} held-out training examples (eval every {selection['eval_every']} steps, {stopping})"


def steps_given(found: dict) -> str:
    """The steps each seed was given (TinyBERT's intermediate-layer steps before the prediction layer's)."""
    return _joined(f"{seed['intermediate_steps']} intermediate + {seed['total_steps']}" if seed["intermediate_steps"]
                   else seed["total_steps"] for seed in found["seeds"])


def _steps(given: str) -> str:
    return f"{given} step" if given == "1" else f"{given} steps"


def protocol(arms: dict[str, dict | None]) -> str:
    """How the arms of one comparison ({name: `arm`}) were trained, in words: each at its own best budget chosen on
    held-out training examples, at equal steps without model selection, or differently (said per arm). It follows
    "trained" or "fine-tuned" in a verdict."""
    if any(found is None for found in arms.values()):
        return "with budgets not recorded"
    chosen = {name: found["selection"] for name, found in arms.items()}
    if all(chosen.values()):
        phrases = {name: selection_words(selection) for name, selection in chosen.items()}
        if len(set(phrases.values())) == 1:
            return f"each arm at its own best budget, chosen on {next(iter(phrases.values()))}"
        return "each arm at its own best budget, chosen on " + "; ".join(f"{name}: {words}"
                                                                       for name, words in phrases.items())
    steps = {name: steps_given(found) for name, found in arms.items()}
    if not any(chosen.values()):
        if len(set(steps.values())) == 1:
            return f"at equal steps (no model selection: {_steps(next(iter(steps.values())))} each)"
        return "at fixed, unequal budgets (no model selection: " + ", ".join(f"{name} {_steps(given)}" for name, given
                                                                            in steps.items()) + ")"
    return "differently: " + "; ".join(
        f"{name} at its own best budget, chosen on {selection_words(chosen[name])}" if chosen[name]
        else f"{name} at a fixed {_steps(steps[name])} (no model selection)" for name in arms)


def stopped(seed: dict) -> str:
    return f"yes, at {seed['trained_steps']}" if seed["stopped_early"] else "no"


def budget_table(arms: dict[str, dict | None]) -> list[str]:
    """One row per arm and task: its seeds, the steps given, the step chosen, whether it stopped early (and at which
    step), its model selection and its wall time (one value per seed, " / " between them)."""
    rows = []
    for name, found in arms.items():
        if found is None:
            continue
        selection = ("none (the last step's model)" if found["selection"] is None
                     else selection_words(found["selection"]))
        for task in dict.fromkeys(seed["task"] for seed in found["seeds"]):
            seeds = [seed for seed in found["seeds"] if seed["task"] == task]
            one_task = {**found, "seeds": seeds}
            seconds = " / ".join("–" if seed["train_seconds"] is None else f"{seed['train_seconds']:.1f}"
                                 for seed in seeds)
            rows.append(f"| {name} | {task} | {', '.join(str(seed['seed']) for seed in seeds)} | "
                        f"{steps_given(one_task)} | {' / '.join(str(seed['chosen_step']) for seed in seeds)} | "
                        f"{' / '.join(stopped(seed) for seed in seeds)} | {selection} | "
                        f"{seconds} |")
    if not rows:
        return []
    return ["| arm | task | seeds | steps given | step chosen | stopped early | model selection | wall time (s) |",
            "|---|---|---|---|---|---|---|---|", *rows]

