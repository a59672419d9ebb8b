"""distil sweep's machinery without running a member: Hydra's sweep syntax, member names, which stage takes which
override, the stage commands under accelerate launch, and the refusals."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from distilbert_cli.cli import app, without_local_rank
from distilbert_cli.config import compose_config, expand_sweep
from distilbert_cli.errors import UsageError
from distilbert_cli.sweeps import Launch, member_name, plan_members, route, stage_command

runner = CliRunner()
COMMANDS = ["init-student", "train", "finetune", "evaluate"]


def test_hydra_sweep_syntax_gives_the_cartesian_product_in_order():
    members = expand_sweep(["+experiment=triple_loss,no_ce", "loss.temperature=range(1,4,2)", "seed=5"])
    assert [overrides for overrides, _ in members] == [
        ["+experiment=triple_loss", "loss.temperature=1", "seed=5"],
        ["+experiment=triple_loss", "loss.temperature=3", "seed=5"],
        ["+experiment=no_ce", "loss.temperature=1", "seed=5"],
        ["+experiment=no_ce", "loss.temperature=3", "seed=5"]]
    assert [swept for _, swept in members][1] == ["+experiment=triple_loss", "loss.temperature=3"]


def test_choice_and_glob_over_a_config_group():
    assert [o for o, _ in expand_sweep(["seed=choice(1,2)"])] == [["seed=1"], ["seed=2"]]
    assert [s for _, s in expand_sweep(["+experiment=glob(no_*)"])] == [
        ["+experiment=no_ce"], ["+experiment=no_cos"], ["+experiment=no_mlm"]]  # conf/experiment/no_*.yaml


def test_a_sweep_of_nothing_is_one_member_and_interval_is_refused():
    assert expand_sweep(["seed=1"]) == [(["seed=1"], [])]
    with pytest.raises(UsageError, match=r"optim.lr=interval\(0.1,1\): distil sweep enumerates comma lists"):
        expand_sweep(["optim.lr=interval(0.1,1)"])
    with pytest.raises(UsageError, match="cannot read the sweep's overrides"):
        expand_sweep(["seed=range("])


def test_member_names_are_hydras_override_dirname():
    assert member_name(["seed=2", "+experiment=no_ce"]) == "+experiment=no_ce,seed=2"  # sorted, comma-joined
    assert member_name(["data.paths=[a/b.txt]"]) == "data.paths=[a%2Fb.txt]"  # one folder, not two
    assert member_name([]) == "base"


def test_each_override_goes_to_the_stages_whose_config_has_it():
    routed = route(["+experiment=random_init", "+debug=tiny", "loss.temperature=4", "task.names=[rte]", "seed=3",
                    "student.num_layers=2"], COMMANDS)
    assert routed == {
        "init-student": ["+experiment=random_init", "seed=3", "student.num_layers=2"],
        "train": ["+experiment=random_init", "+debug=tiny", "loss.temperature=4", "seed=3"],
        "finetune": ["+experiment=random_init", "+debug=tiny", "task.names=[rte]", "seed=3"],  # its logger=none
        "evaluate": ["+experiment=random_init", "task.names=[rte]", "seed=3"]}
    with pytest.raises(UsageError, match="lossx.temperature=4: none of the sweep's stages .* has the key 'lossx'"):
        route(["lossx.temperature=4"], COMMANDS)


def test_members_get_their_own_run_dir_quoted_and_the_sweeps_as_upstream(tmp_path):
    root = tmp_path / "t4"
    members = plan_members(root, ["+experiment=triple_loss,no_ce", "+debug=tiny"], ["train"])
    assert [m.name for m in members] == ["+experiment=triple_loss", "+experiment=no_ce"]
    command, overrides = members[1].commands[0]
    assert command == "train" and overrides[:2] == ["+experiment=no_ce", "+debug=tiny"]
    cfg = compose_config("train", overrides)  # the quoted folder name (= and , in it) reads back as written
    assert cfg.run_dir == str(root / "sweep" / "+experiment=no_ce") and cfg.upstream_run_dir == str(root)
    assert cfg.loss.alpha_ce == 0 and members[1].swept == {"+experiment": "no_ce"}


def test_a_member_whose_config_is_refused_carries_its_error(tmp_path):
    members = plan_members(tmp_path, ["loss.temperature=2,-1"], ["init-student", "train"])
    assert [m.error for m in members] == [
        None, "train: loss.temperature=-1: input should be greater than 0"]
    with pytest.raises(UsageError, match="upstream_run_dir is set by distil sweep"):
        plan_members(tmp_path, ["upstream_run_dir=x"], ["train"])


def test_training_stages_run_under_accelerate_launch_with_one_process_per_gpu():
    python = sys.executable
    assert stage_command("train", ["seed=1"], Launch(gpus=1)) == [python, "-m", "distilbert_cli", "train", "seed=1"]
    assert stage_command("evaluate", ["seed=1"], Launch(gpus=8))[:4] == [python, "-m", "distilbert_cli", "evaluate"]
    argv = stage_command("train", ["seed=1"], Launch(gpus=8, main_port=29600))
    assert argv == [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "8",
                    "--num_machines", "1", "--main_process_port", "29600", "--dynamo_backend", "no",
                    "-m", "distilbert_cli", "train", "seed=1"]
    argv = stage_command("finetune", [], Launch(gpus=4, nodes=2, node_rank=1, main_host="node-a", main_port=29700))
    assert argv[3:17] == ["--multi_gpu", "--num_processes", "8", "--num_machines", "2", "--machine_rank", "1",
                          "--main_process_ip", "node-a", "--main_process_port", "29700", "--rdzv_backend", "c10d",
                          "--dynamo_backend"]


def test_stages_out_of_the_pipelines_order_are_refused():
    result = runner.invoke(app, ["sweep", "sweep.stages=[train,init-student]", "--cfg"])
    assert result.exit_code == 2
    assert "sweep.stages=['train', 'init-student']: must follow the pipeline's order (prepare-data, init-student" \
        in result.output


def test_the_sweeps_own_config_leaves_the_members_overrides_out():
    result = runner.invoke(app, ["sweep", "runs/t4", "+experiment=no_ce,no_cos", "loss.temperature=4", "--cfg"])
    assert result.exit_code == 0, result.output
    assert "run_dir: runs/t4" in result.output and "loss" not in result.output


def test_the_local_rank_argument_of_an_old_launcher_is_dropped():
    assert without_local_rank(["--local_rank=1", "seed=1", "--local-rank=0"]) == ["seed=1"]
    result = runner.invoke(app, ["report", "--local_rank=1", "run_dir=runs/x", "--cfg"])
    assert result.exit_code == 0 and "run_dir: runs/x" in result.output


def test_slurm_without_slurm_is_one_line_and_exit_2(tmp_path, tiny_teacher, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    result = runner.invoke(app, ["sweep", str(tmp_path / "t"), "sweep.stages=[init-student]", "sweep.launcher=slurm",
                                 "student.num_layers=1,2", f"teacher.name_or_path={tiny_teacher}"])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == ["error: sweep.launcher=slurm needs SLURM (no sbatch on PATH); use sweep.launcher=local or "
                      "submitit_local on this machine"]
    assert not (tmp_path / "t" / "sweep" / "student.num_layers=1" / "init-student").exists()
