"""The `fedpeat` command line: help for every subcommand, clear errors for bad values."""

import json
import subprocess
import sys

import pytest

from fedpeat_jax import cli


def fedpeat(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "fedpeat_jax.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_top_level_help_lists_every_subcommand():
    out = fedpeat("--help")
    assert out.returncode == 0
    for name in cli.SUBCOMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", sorted(cli.SUBCOMMANDS))
def test_help_of_every_subcommand(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.SUBCOMMANDS[name][0](["--help"])
    assert exit_info.value.code == 0
    assert "usage: fedpeat " + name in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["tune", "--client-lr", "-1"], "--client-lr (FedConfig.client_lr) must be > 0"),
        (
            ["tune", "--emulator-levels", "9", "--preset", "tiny"],
            "--emulator-levels (FedConfig.emulator_levels) [9] larger than the model's middle",
        ),
        (["tune", "--kind", "nonsense"], "--kind (PeftConfig.kind) must be one of"),
        (["tune", "--partition", "random"], "--partition (TaskConfig.partition) must be one of"),
        (["tune", "--model-dir", "/nonexistent/gpt2"], "model directory /nonexistent/gpt2 does not exist"),
        (["calibrate", "--levels", "3,1"], "--levels (CalibrateConfig.levels) must be strictly increasing"),
        (["calibrate", "--adapter-l", "4", "--adapter-r", "4"], "leaves no middle block in the 8-block model"),
        (["calibrate", "--server-domains", "modern,klingon"], "must be distinct names from ('modern', 'target')"),
        (["live", "--baselines", "greedy,oracle"], "--baselines: unknown ['oracle']"),
        (["tune", "--config", "/nonexistent.json"], "--config: no such file"),
        (["quickstart", "--rounds", "0"], "--rounds (QuickstartConfig.rounds) must be an integer >= 1"),
        (
            ["quickstart", "--tiny", "--controller-envs", "4"],
            "--controller-envs (QuickstartConfig.controller_envs) = 4 makes no valid SABPPO run: "
            "SABPPOConfig.num_minibatches (16) must divide",
        ),
        (
            ["quickstart", "--preset", "gpt2"],
            "--preset (QuickstartConfig.preset) must be one of ('tiny', 'default', 'base')",
        ),
        (["pretrain", "--steps", "0"], "--steps (PretrainConfig.steps) must be an integer >= 1"),
        (
            ["offsite-table", "--offsite-warmup", "100", "--offsite-steps", "60"],
            "--offsite-warmup (OffsiteConfig.warmup) must be in [0, steps=60)",
        ),
        (["distill", "--kd-weight", "-1"], "--kd-weight (DistillConfig.kd_weight) must be >= 0"),
        (["train-controller", "--num-envs", "0"], "--num-envs (SABPPOConfig.num_envs) must be an integer >= 1"),
    ],
)
def test_bad_values_name_the_option(args, message, capsys):
    assert cli.main(args) == 2  # in-process: main is exactly what the `fedpeat` script runs
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith(f"fedpeat {args[0]}: error: "), err


def test_a_bad_value_from_the_shell_exits_2_with_one_line():
    out = fedpeat("tune", "--client-lr", "-1")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "--client-lr (FedConfig.client_lr) must be > 0" in out.stderr and "Traceback" not in out.stderr


def test_unknown_option_and_subcommand_are_refused():
    assert fedpeat("tune", "--no-such-option", "1").returncode == 2
    assert fedpeat("no-such-command").returncode == 2


def test_config_file_sections_and_overrides(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"fed": {"rounds": 7, "client_lr": 0.5}, "peft": {"lora_rank": 2}}))
    parser = __import__("argparse").ArgumentParser()
    parser.add_argument("--config")
    groups = cli._groups_tune()
    table = cli.add_groups(parser, groups)
    configs = cli.build_configs(parser.parse_args(["--config", str(path), "--client-lr", "0.25"]), table, groups)
    assert configs["fed"].rounds == 7 and configs["fed"].client_lr == 0.25 and configs["peft"].lora_rank == 2
    path.write_text(json.dumps({"fed": {"no_such_field": 1}}))
    with pytest.raises(ValueError, match="unknown field"):
        cli.build_configs(parser.parse_args(["--config", str(path)]), table, groups)
