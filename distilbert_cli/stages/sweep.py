"""`distil sweep`: a chain of stages for every member of a Hydra sweep, sharing the run's upstream stages.

    distil sweep 'sweep.stages=[init-student,train,finetune,evaluate]' \\
        +experiment=triple_loss,no_ce,no_cos,no_mlm,random_init run_dir=runs/t4      # the paper's Table 4
    distil sweep ... sweep.status=true                  # each member's state, from its manifests
    distil sweep ... sweep.launcher=slurm sweep.slurm.partition=gpu sweep.slurm.gpus_per_node=8

The overrides other than `sweep.*` and `run_dir` are the members': Hydra's sweep syntax makes one member per
combination, and each override goes to the member stages whose config has its key (`report.*` to the closing
report). Each member is `<run_dir>/sweep/<override_dirname>/`, a run directory whose `upstream_run_dir` is
`run_dir`: the complete stages of `run_dir` (prepare-data, say) are read there, without a copy, and verified.
A member that fails leaves the others running; its error is listed and the sweep exits 2 at the end. Running the
same sweep again skips its complete members and retries the others from their first incomplete stage. Then
`distil report` over the members (`sweep.report`), whose member table ends the output.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from distilbert_cli import artifacts, sweeps
from distilbert_cli.config import SWEEP_KEYS, split_overrides
from distilbert_cli.errors import UsageError
from distilbert_cli.reporting import MEMBER_TABLE_HEADING
from distilbert_cli.rundir import Run, stage_lock, write_json_atomic
from distilbert_cli.schema import Sweep

log = logging.getLogger(__name__)


def status_table(states: list[dict], commands: Sequence[str]) -> str:
    lines = ["| member | state | " + " | ".join(commands) + " | error |",
             "|---|---|" + "---|" * len(commands) + "---|"]
    for state in states:
        stages = " | ".join(state["stages"][command] for command in commands)
        lines.append(f"| {state['member']} | {state['state']} | {stages} | {state['error'] or ''} |")
    return "\n".join(lines)


def _report(root: Path, overrides: Sequence[str]) -> str | None:
    """`distil report` over the sweep (its own process); the member table of the report, or None if it failed."""
    argv = [sys.executable, "-m", "distilbert_cli", "report", f"run_dir={root}", "overwrite=true", *overrides]
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        log.warning("distil report over the sweep failed: %s", (errors or result.stderr.splitlines() or ["?"])[-1])
        return None
    text = (Run(root).stage_dir(artifacts.REPORT) / "report.md").read_text()
    section = text.split(MEMBER_TABLE_HEADING, 1)[1].split("\n## ", 1)[0]
    return MEMBER_TABLE_HEADING + section.rstrip()


def run(cfg: Sweep, overrides: Sequence[str] = ()) -> dict:
    root, settings, commands = Path(cfg.run_dir), cfg.sweep, list(cfg.sweep.stages)
    _, rest = split_overrides(overrides, SWEEP_KEYS)
    report_overrides, member_overrides = split_overrides(rest, ("report",))
    members = sweeps.plan_members(root, member_overrides, commands)
    if settings.status:
        states = [sweeps.member_state(member) for member in members]
        log.info("sweep %s: %d member(s)\n%s", root, len(members), status_table(states, commands))
        return {"members": states}

    sweep_dir = artifacts.SweepOutputs(Run(root).stage_dir(artifacts.SWEEP))
    with stage_lock(root, artifacts.SWEEP):
        member_stages = {artifacts.COMMAND_STAGES[command] for command in commands}
        shared = [stage for stage in artifacts.STAGES if stage not in member_stages and Run(root).complete(stage)]
        log.info("sweep of %d member(s) over %s; shared by every member, in place: %s", len(members),
                 ", ".join(commands), ", ".join(shared) or "nothing")
        sweep_dir.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(sweep_dir.record, {"stages": commands, "overrides": list(overrides), "shared": shared,
                                             "members": [asdict(member) for member in members]})
        results, to_run = sweeps.Results(), []
        for member in members:
            state = sweeps.member_state(member)
            if member.error is not None:
                results.outcomes[member.name] = sweeps.fail_unlaunched(member, member.error)
            elif state["state"] == sweeps.COMPLETE and not member.overwrite:
                if stale := sweeps.stale_overrides(member):
                    results.outcomes[member.name] = sweeps.fail_unlaunched(
                        member, f"its complete {', '.join(stale)} ran with other overrides: pass overwrite=true to "
                                "run it again, or sweep into another run_dir")
                else:
                    log.info("member %s: complete, skipped", member.name)
                    results.outcomes[member.name] = {"member": member.name, "status": sweeps.COMPLETE}
            else:
                to_run.append(member)
        if to_run and settings.launcher == "local":
            results.outcomes.update(sweeps.run_local(to_run, settings.parallel, sweeps.local_gpus()).outcomes)
        elif to_run:
            cluster = "slurm" if settings.launcher == "slurm" else "local"
            results.outcomes.update(sweeps.run_submitit(to_run, settings, sweep_dir.jobs, cluster).outcomes)

    table = _report(root, report_overrides) if settings.report and any(
        Run(Path(member.run_dir)).complete(artifacts.DISTILL) for member in members) else None
    if table is not None:
        log.info("sweep report: %s\n%s", Run(root).stage_dir(artifacts.REPORT) / "report.md", table)
    if failed := results.failed():
        listed = "; ".join(f"{name} ({o['failed_stage'] or 'not run'}: {o['error']})" for name, o in failed.items())
        raise UsageError(f"{len(failed)} of {len(members)} sweep member(s) failed: {listed}")
    return {"members": results.outcomes}
