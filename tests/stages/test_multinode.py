"""Two "machines" on localhost (accelerate launch --num_machines 2, c10d rendezvous, gloo; one process each, so each
is its own local rank 0) train as 1 process accumulating 2 micro batches does, and only the global main process
writes the shared run directory: the launch of scripts/slurm/distill_multinode.sbatch, without SLURM."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from builders import write_corpus
from safetensors.torch import load_file

from distilbert_cli.config import compose_config
from distilbert_cli.rundir import read_manifest
from distilbert_cli.stages import init_student, prepare_data, train
from distilbert_cli.sweeps import free_port

TESTS = Path(__file__).resolve().parents[1]
SETTINGS = ["+experiment=triple_loss", "+debug=tiny", "train.deterministic=true", "optim.max_grad_norm=null",
            "batch.global_batch_size=4", "batch.micro_batch_size=2"]


def run_stage(stage, config: str, overrides: list[str]) -> None:
    stage.run(compose_config(config, overrides), overrides)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_teacher) -> Path:
    """A run directory after prepare-data and init-student (a 3-layer student of the tiny teacher)."""
    root = tmp_path_factory.mktemp("multinode")
    run_dir, corpus = root / "inputs", write_corpus(root / "corpus.txt")
    run_stage(prepare_data, "prepare_data", [f"teacher.name_or_path={tiny_teacher}", f"run_dir={run_dir}",
                                             "data=local", f"data.paths=[{corpus}]", "prepare.validation_size=12",
                                             "prepare.num_proc=1", "prepare.max_seq_length=64"])
    run_stage(init_student, "init_student", [f"teacher.name_or_path={tiny_teacher}", f"run_dir={run_dir}",
                                             "student.num_layers=3"])
    return run_dir


def machine(rank: int, port: int, run_dir: Path, audit_dir: Path, output: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
               "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), "--rdzv_backend", "c10d", "--mixed_precision", "no",
               "--dynamo_backend", "no", str(TESTS / "multinode_worker.py"), str(run_dir), str(audit_dir), "train",
               *SETTINGS, f"run_dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(TESTS.parent)}
    with output.open("w") as handle:  # a file, not a pipe: a full pipe would stall the machine at a barrier
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)


def listening(port: int, process: subprocess.Popen, timeout: float) -> None:
    """Wait until something accepts connections on the port (machine 0's rendezvous store), or `process` ends."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)


def wait_for(machines: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Their exit codes; once one fails, or at the timeout, the others are stopped (they would wait for it)."""
    deadline = time.monotonic() + timeout
    while any(m.poll() is None for m in machines) and time.monotonic() < deadline:
        if any(m.poll() not in (None, 0) for m in machines):
            break
        time.sleep(0.5)
    for m in machines:
        if m.poll() is None:
            m.kill()
            m.wait()
    return [m.returncode for m in machines]


def metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k.startswith("loss") or k == "step"} for line in lines]


@pytest.mark.slow  # two launches of distil train on tiny models (~1 min on 2 cores)
def test_two_machines_train_as_one_process_with_accumulation_and_only_the_global_main_writes(inputs, tmp_path):
    single, shared, audit = tmp_path / "single", tmp_path / "shared", tmp_path / "audit"
    shutil.copytree(inputs, single)
    shutil.copytree(inputs, shared)
    audit.mkdir()
    run_stage(train, "train", [*SETTINGS, f"run_dir={single}"])

    port = free_port()
    logs = [tmp_path / f"machine-{rank}.txt" for rank in (0, 1)]
    # Machine 0 first: on one host both c10d agents could host the rendezvous store, and accelerate refuses to start
    # machine 0 on a port already taken (by machine 1's store); on a cluster each machine checks its own host.
    machines = [machine(0, port, shared, audit, logs[0])]
    listening(port, machines[0], timeout=300)
    machines.append(machine(1, port, shared, audit, logs[1]))
    codes = wait_for(machines, timeout=600)
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)

    assert [(m["world_size"], m["accumulation"]) for m in map(read_manifest, (shared / "distill", single / "distill"))
            ] == [(2, 1), (1, 2)]
    ours, theirs = metrics(shared), metrics(single)
    assert [row["step"] for row in ours] == [row["step"] for row in theirs] == [1, 2, 3, 4]
    for mine, one in zip(ours, theirs, strict=True):
        assert mine == pytest.approx(one, rel=1e-5, abs=1e-7)
    two_machines, one_process = (load_file(run / "distill" / "final" / "model.safetensors") for run in (shared, single))
    assert two_machines.keys() == one_process.keys()
    for name, tensor in one_process.items():
        torch.testing.assert_close(two_machines[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")

    # c10d rendezvous gives the global ranks: machine_rank 1 may host global rank 0
    main_writes, other_writes = (json.loads((audit / f"writes-rank{rank}.json").read_text()) for rank in (0, 1))
    assert ["open", str(shared / "distill" / ".tmp-manifest.json")] in main_writes  # the hook sees the writes
    assert other_writes == []  # rank 1, its machine's local rank 0, wrote nothing there
