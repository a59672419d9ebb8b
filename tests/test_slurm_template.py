"""scripts/slurm/multinode.sbatch with SLURM's commands replaced by stand-ins: every variable the launch uses is set
(the script runs under `set -u`), and each node gets its machine rank and the first node's address."""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "multinode.sbatch"


def stand_in(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)


def test_each_node_launches_its_gpus_with_its_machine_rank_and_the_first_nodes_address(tmp_path):
    stand_in(tmp_path, "scontrol", 'printf "gpu-a\\ngpu-b\\n"')  # `scontrol show hostnames` of a 2-node job
    # srun runs the command once per node, each with its SLURM_NODEID; its own options are dropped
    stand_in(tmp_path, "srun", 'while [[ $1 == --* ]]; do shift; done\n'
                               'for node in 0 1; do SLURM_NODEID=$node "$@" > "launch-$node.txt"; done')
    stand_in(tmp_path, "python", 'printf "%s\\n" "$@"')  # prints the argv it was given, one per line
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "PYTHON": str(tmp_path / "python"), "SLURM_JOB_NUM_NODES": "2",
           "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_JOB_ID": "123456"}
    result = subprocess.run(["bash", str(SCRIPT), "train", "+experiment=triple_loss", "run_dir=/shared/runs/a b"],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "distil train on 2 node(s) x 4 GPU(s) = 8 processes; main gpu-a:23456" in result.stdout
    for node in (0, 1):
        argv = (tmp_path / f"launch-{node}.txt").read_text().splitlines()
        assert argv == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2", "--num_processes",
                        "8", "--machine_rank", str(node), "--main_process_ip", "gpu-a", "--main_process_port", "23456",
                        "--rdzv_backend", "c10d", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "-m", "distilbert_cli", "train", "+experiment=triple_loss", "run_dir=/shared/runs/a b"]


def test_a_missing_slurm_variable_stops_the_script(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), "train"], env={"PATH": "/usr/bin:/bin"}, capture_output=True,
                            text=True)
    assert result.returncode != 0 and "SLURM_JOB_NUM_NODES: unbound variable" in result.stderr
