"""`distil sweep`'s machinery: the members of a sweep, the stage commands each one runs, and the launchers.

A sweep is Hydra's sweep syntax over the members' overrides (distilbert_cli.config.expand_sweep: Hydra's own parser,
so comma lists, `range()`, `choice()` and `glob()` mean what they mean to Hydra). Each member is a run directory,
`<run_dir>/sweep/<override_dirname>/` (its swept overrides, sorted, `key=value` joined by commas, as Hydra's
`override_dirname`), whose `upstream_run_dir` is the sweep's run: the complete stages of the sweep's run that the
member does not run itself (prepare-data, say) are read in place, without a copy, and verified on use.

Every member stage is a process of its own (`python -m distilbert_cli <command> ...`; the training stages under
`accelerate launch`, one process per GPU, when there are several), so a member that fails, even by a crash, leaves
the others running, and its error line is kept in its `member.json`. Launchers: `local` (members one after another,
or `sweep.parallel` at once, the GPUs shared out between them), `submitit_local` and `slurm` (one submitit job per
member; the same code path, the first on this machine). Each member's run directory is explicit, resolved once by
the sweep: no process re-resolves it (Hydra's `${now:}` directories under DDP, hydra issue 2070), and no Hydra
`-m` reaches `accelerate launch` (accelerate issue 582).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from queue import Queue
from typing import TYPE_CHECKING

from distilbert_cli import artifacts
from distilbert_cli.config import (
    PRESET_GROUPS,
    compose_config,
    compose_unvalidated,
    expand_sweep,
    override_key,
    quoted,
)
from distilbert_cli.errors import UsageError, first_line
from distilbert_cli.rundir import Run, read_manifest, write_json_atomic

if TYPE_CHECKING:
    from distilbert_cli.schema import SweepSettings

log = logging.getLogger(__name__)

# The stages that train, run under `accelerate launch` with one process per GPU (the others use one process).
MULTI_PROCESS_COMMANDS = ("train", "finetune")
COMPLETE, FAILED, RUNNING, PENDING = "complete", "failed", "running", "pending"
_NODE_POLL_SECONDS = 5.0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def member_name(swept: Sequence[str]) -> str:
    """Hydra's `override_dirname` of the swept overrides (sorted, joined by commas), `/` escaped for a folder name;
    `base` for a sweep that sweeps nothing (a single member)."""
    return ",".join(sorted(swept)).replace("/", "%2F") or "base"


@dataclass(frozen=True)
class Member:
    """One member of a sweep: its folder name, the overrides each of its stage commands gets, its swept values."""

    name: str
    run_dir: str
    commands: list[tuple[str, list[str]]]  # (command, its overrides, run_dir and upstream_run_dir included)
    swept: dict[str, str]  # the swept overrides' key -> value, e.g. {"+experiment": "no_ce"}
    overwrite: bool = False  # re-run complete stages (the members' `overwrite=true`)
    error: str | None = None  # a config no stage command would accept: the member fails without running


@dataclass(frozen=True)
class Launch:
    """How a member job runs its training stages: how many GPUs it has, and the machines of a multi-node job."""

    gpus: int = 0
    devices: str | None = None  # CUDA_VISIBLE_DEVICES of the member (the local launcher shares the GPUs out)
    nodes: int = 1
    node_rank: int = 0
    main_host: str | None = None
    main_port: int | None = None


def route(overrides: Sequence[str], commands: Sequence[str]) -> dict[str, list[str]]:
    """Which stage commands take each override: a preset (`+experiment=`, `+debug=`) goes to every command it
    composes with (each keeps its own sections of it: `+debug=tiny` gives train its tiny budget, and train and
    finetune logger=none), or to all when it composes with none (so each says why); any other override to the
    commands whose config has its top-level key. An override no command has is a UsageError (a typo would otherwise
    sweep nothing)."""
    routed: dict[str, list[str]] = {command: [] for command in commands}
    for override in overrides:
        key = override_key(override)
        if key in PRESET_GROUPS:
            takers = [c for c in commands if _composes(c, override)] or list(commands)
        else:
            takers = [c for c in commands if key.split(".")[0] in _top_level_keys(c)]
        if not takers:
            raise UsageError(f"{override}: none of the sweep's stages ({', '.join(commands)}) has the key "
                             f"{key.split('.')[0]!r}")
        for command in takers:
            routed[command].append(override)
    return routed


@functools.cache
def _top_level_keys(command: str) -> frozenset[str]:
    return frozenset(compose_unvalidated(config_name(command)))


@functools.cache
def _composes(command: str, override: str) -> bool:
    try:
        compose_unvalidated(config_name(command), [override])
    except UsageError:
        return False
    return True


def config_name(command: str) -> str:
    """The primary config of a stage command: conf/<name>.yaml."""
    return command.replace("-", "_")


def plan_members(root: Path, overrides: Sequence[str], commands: Sequence[str]) -> list[Member]:
    """The sweep's members, each with its stage commands' overrides and config validated (a member no command
    would accept carries its error instead, and fails without running anything)."""
    if any(override_key(o) == "upstream_run_dir" for o in overrides):
        raise UsageError("upstream_run_dir is set by distil sweep (the sweep's run_dir, for every member)")
    sweep_dir = artifacts.SweepOutputs(root / artifacts.SWEEP)
    members, names = [], set()
    for member_overrides, swept in expand_sweep(overrides):
        name = member_name(swept)
        if name in names:
            raise UsageError(f"two members of the sweep are both named {name!r}")
        names.add(name)
        run_dir = sweep_dir.member(name)
        routed = route(member_overrides, commands)
        stage_commands = [(c, [*routed[c], f"run_dir={quoted(str(run_dir))}", f"upstream_run_dir={quoted(str(root))}"])
                          for c in commands]
        error, overwrite = None, False
        for command, command_overrides in stage_commands:
            try:
                overwrite = compose_config(config_name(command), command_overrides).overwrite
            except UsageError as exc:
                error = f"{command}: {exc}"
                break
        swept_values = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in swept}
        members.append(Member(name, str(run_dir), stage_commands, swept_values, overwrite, error))
    return members


def member_state(member: Member) -> dict:
    """A member's state from its stage manifests and its member.json: each stage's status, the member's state
    (complete, failed, running, pending) and, for a failed one, the error line of its last attempt."""
    run = Run(Path(member.run_dir))
    stages = {}
    for command, _ in member.commands:
        manifest = read_manifest(run.stage_dir(artifacts.COMMAND_STAGES[command]))
        stages[command] = manifest["status"] if manifest is not None else PENDING
    outcome = _read_outcome(member)
    if member.error is not None:
        state, error = FAILED, member.error
    elif all(status == COMPLETE for status in stages.values()):
        state, error = COMPLETE, None
    elif outcome.get("status") == FAILED:
        state, error = FAILED, outcome.get("error")
    elif RUNNING in stages.values() or outcome.get("status") == RUNNING:
        state, error = RUNNING, None
    else:
        state, error = PENDING, None
    return {"member": member.name, "state": state, "stages": stages, "error": error}


def _outcome_path(member: Member) -> Path:
    return artifacts.SweepOutputs(Path(member.run_dir).parent).member_record(member.name)


def _read_outcome(member: Member) -> dict:
    path = _outcome_path(member)
    return artifacts.read_json(path) if path.is_file() else {}


def stale_overrides(member: Member) -> list[str]:
    """The stages a complete member ran with overrides other than the sweep's now (leaving out `overwrite`)."""
    run, stale = Run(Path(member.run_dir)), []
    for command, command_overrides in member.commands:
        manifest = read_manifest(run.stage_dir(artifacts.COMMAND_STAGES[command]))
        if manifest is not None and manifest["status"] == COMPLETE:
            ran = [o for o in manifest["overrides"] if override_key(o) != "overwrite"]
            if ran != [o for o in command_overrides if override_key(o) != "overwrite"]:
                stale.append(command)
    return stale


def stage_command(command: str, overrides: Sequence[str], launch: Launch, python: str = sys.executable) -> list[str]:
    """The argv of one member stage: `python -m distilbert_cli <command> ...`, or for a training stage with several
    GPUs (or machines) `accelerate launch` with one process per GPU (on several machines, each machine's rank, the
    main machine's address and port, and c10d rendezvous)."""
    cli = ["-m", "distilbert_cli", command, *overrides]
    processes = launch.gpus * launch.nodes
    if command not in MULTI_PROCESS_COMMANDS or processes <= 1:
        return [python, *cli]
    machines = ["--num_machines", str(launch.nodes)]
    if launch.nodes > 1:
        machines += ["--machine_rank", str(launch.node_rank), "--main_process_ip", str(launch.main_host),
                     "--main_process_port", str(launch.main_port), "--rdzv_backend", "c10d"]
    else:
        machines += ["--main_process_port", str(launch.main_port or free_port())]
    return [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            *machines, "--dynamo_backend", "no", *cli]


def free_port() -> int:
    """A TCP port free now, for one machine's process group (members at once on one machine each need their own)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _error_line(log_path: Path) -> str:
    """The last `error:` line a stage printed, else its last line (a traceback's)."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    return errors[-1].removeprefix("error: ") if errors else (lines[-1] if lines else "no output")


def _write_outcome(member: Member, **outcome) -> None:
    path = _outcome_path(member)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"member": member.name, **outcome})


def run_member(member: Member, launch: Launch | None = None) -> dict:
    """Run a member's stages in order (in a thread of the sweep, or as a submitit job), each as its own process,
    output appended to `<member>/sweep-log.txt`. Complete stages are skipped until the first one that runs; those
    after it run with overwrite=true (they read what it rewrites). Returns the member's outcome, also written to its
    member.json. On several machines only the first runs the single-process stages; the others wait for it."""
    launch = launch or job_launch()
    run_dir, started = Path(member.run_dir), _now()
    run_dir.mkdir(parents=True, exist_ok=True)
    lead = launch.node_rank == 0
    where = {"host": socket.gethostname(), "pid": os.getpid()}  # the job's (a thread of the sweep's, locally)
    if lead:
        _write_outcome(member, status=RUNNING, started_at=started, **where)
    log_path = run_dir / "sweep-log.txt"
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": launch.devices} if launch.devices is not None else {})}
    rerun = member.overwrite
    for index, (command, overrides) in enumerate(member.commands):
        stage = Run(run_dir).stage_dir(artifacts.COMMAND_STAGES[command])
        manifest = read_manifest(stage)
        if not rerun and manifest is not None and manifest["status"] == COMPLETE:
            continue
        rerun = True
        together = command in MULTI_PROCESS_COMMANDS and launch.nodes > 1
        if lead or together:
            argv = stage_command(command, [*overrides, "overwrite=true"], launch)
            with log_path.open("a") as handle:
                handle.write(f"\n$ {' '.join(argv)}\n")
                handle.flush()
                code = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
        else:
            code = _wait_for_lead(run_dir, index)
        if launch.nodes > 1 and lead and not together:
            write_json_atomic(_node_marker(run_dir, index), {"code": code})
        if code != 0:
            outcome = {"status": FAILED, "failed_stage": command, "error": _error_line(log_path),
                       "started_at": started, "ended_at": _now(), **where}
            if lead:
                _write_outcome(member, **outcome)
            return {"member": member.name, **outcome}
    outcome = {"status": COMPLETE, "started_at": started, "ended_at": _now(), **where}
    if lead:
        _write_outcome(member, **outcome)
    return {"member": member.name, **outcome}


def fail_unlaunched(member: Member, error: str) -> dict:
    """The outcome of a member that is not run (a config its stages refuse, stale complete stages)."""
    outcome = {"status": FAILED, "failed_stage": None, "error": error, "ended_at": _now()}
    _write_outcome(member, **outcome)
    return {"member": member.name, **outcome}


def _node_marker(run_dir: Path, index: int) -> Path:
    return run_dir / ".sweep-nodes" / f"stage-{index}.json"


def _wait_for_lead(run_dir: Path, index: int) -> int:
    """On a machine other than the first of a multi-node member: the exit code of the stage the first ran."""
    marker = _node_marker(run_dir, index)
    marker.parent.mkdir(parents=True, exist_ok=True)
    while not marker.is_file():
        time.sleep(_NODE_POLL_SECONDS)
    return artifacts.read_json(marker)["code"]


def job_launch() -> Launch:
    """The launch of a submitit job: its GPUs and, on several nodes, this node's rank and the first node's address
    (a port every node derives from the job id)."""
    import submitit
    import torch

    gpus = torch.cuda.device_count()
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not a submitit job
        return Launch(gpus=gpus)
    if env.num_nodes == 1:
        return Launch(gpus=gpus)
    return Launch(gpus=gpus, nodes=env.num_nodes, node_rank=env.node, main_host=env.hostnames[0],
                  main_port=20000 + int(env.job_id.split("_")[0]) % 20000)


@dataclass
class Results:
    """What became of each member of one sweep invocation."""

    outcomes: dict[str, dict] = field(default_factory=dict)

    def failed(self) -> dict[str, dict]:
        return {name: o for name, o in self.outcomes.items() if o["status"] == FAILED}


def run_local(members: list[Member], parallel: int, gpus: int) -> Results:
    """Members in threads of this process, `parallel` at once, each stage a child process; the GPUs are shared out
    (each member at once gets gpus // parallel of them)."""
    if gpus and parallel > gpus:
        raise UsageError(f"sweep.parallel={parallel} members at once on {gpus} GPU(s): each needs one at least")
    slots: Queue[Launch] = Queue()
    share = gpus // parallel if gpus else 0
    for slot in range(parallel):
        devices = ",".join(str(d) for d in range(slot * share, (slot + 1) * share)) if share else None
        slots.put(Launch(gpus=share, devices=devices))

    def run(member: Member) -> dict:
        launch = slots.get()
        try:
            log.info("member %s: running %s", member.name, ", ".join(c for c, _ in member.commands))
            outcome = run_member(member, launch)
            log.info("member %s: %s%s", member.name, outcome["status"],
                     f" ({outcome['failed_stage']}: {outcome['error']})" if outcome["status"] == FAILED else "")
            return outcome
        finally:
            slots.put(launch)

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return Results(dict(zip([m.name for m in members], pool.map(run, members), strict=True)))


def run_submitit(members: list[Member], settings: SweepSettings, jobs_dir: Path, cluster: str) -> Results:
    """One submitit job per member (an array job), on SLURM (`cluster="slurm"`) or as processes on this machine
    (`"local"`, the same code path); waits for every job. A job that dies (killed, timed out) is a failed member."""
    import submitit
    from submitit.core.utils import UncompletedJobError

    slurm = settings.slurm
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise UsageError("sweep.launcher=slurm needs SLURM (no sbatch on PATH); use sweep.launcher=local or "
                         "submitit_local on this machine")
    if cluster == "local" and slurm.nodes > 1:
        raise UsageError(f"sweep.launcher=submitit_local runs on this machine: sweep.slurm.nodes={slurm.nodes} needs "
                         "sweep.launcher=slurm")
    executor = submitit.AutoExecutor(folder=str(jobs_dir / "%j"), cluster=cluster)
    parameters = {"name": "distil-sweep", "timeout_min": slurm.timeout_min, "nodes": slurm.nodes,
                  "tasks_per_node": 1, "gpus_per_node": slurm.gpus_per_node, "cpus_per_task": slurm.cpus_per_task,
                  "slurm_array_parallelism": slurm.array_parallelism}
    parameters.update({key: value for key, value in (("slurm_partition", slurm.partition),
                                                     ("slurm_account", slurm.account)) if value is not None})
    executor.update_parameters(**parameters)
    with executor.batch():
        jobs = [executor.submit(run_member, member) for member in members]
    log.info("submitted %d job(s) (%s): %s", len(jobs), cluster, ", ".join(job.job_id for job in jobs))
    results = Results()
    for member, job in zip(members, jobs, strict=True):
        try:
            outcome = job.result()
        except (UncompletedJobError, submitit.core.utils.FailedJobError) as exc:
            outcome = {"member": member.name, "status": FAILED, "failed_stage": None,
                       "error": f"job {job.job_id} ended without a result: {first_line(exc)}"}
            _write_outcome(member, **{k: v for k, v in outcome.items() if k != "member"})
        log.info("member %s (job %s): %s", member.name, job.job_id, outcome["status"])
        results.outcomes[member.name] = outcome
    return results


def local_gpus() -> int:
    """GPUs this process sees (CUDA_VISIBLE_DEVICES respected)."""
    import torch

    return torch.cuda.device_count()
