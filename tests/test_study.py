"""scripts/fedpeat_study.py: FedPEAT against its baselines.

The `--tiny` run goes through the whole CLI path (tiny foundation model, Folio-spelling clients,
all five methods) and its results must be internally consistent: who sends, holds and computes
more, and what the files contain. Every method is a configuration of the one `FedPEAT` round.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedpeat_jax.config import GPT2Config, PeftConfig

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fedpeat_study.py"


METHODS = ["fedpeat_lora", "fed_full_adapter", "fed_lora_full_model", "fed_full_ft", "local_lora"]


@pytest.mark.slow  # a subprocess of every method (about 2.5 minutes): behind --runslow to keep the default suite short
def test_tiny_study_results_are_consistent(tmp_path):
    out = tmp_path / "study"
    # Unoptimized machine code compiles about twice as fast; the tiny run's timings mean nothing anyway.
    env = {
        **os.environ,
        "FEDPEAT_NO_PROGRESS": "1",
        "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip(),
    }
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], capture_output=True, text=True, timeout=900, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads((out.with_name("study.json")).read_text())

    for key in (
        "config",
        "model",
        "emulator",
        "task",
        "zero_shot_ppl",
        "mec_parameters",
        "methods",
        "machine",
        "loadavg_start",
        "loadavg_end",
        "wall_seconds",
    ):
        assert key in res, key
    assert len(res["loadavg_end"]) == 3 and res["machine"]["cpus_usable"] >= 1
    # Every method is a configuration of the library's one round.
    configs = {k: r["config"] for k, r in res["methods"].items()}
    assert configs["fedpeat_lora"] == {
        "trainable": "adapter",
        "algorithm": "fedavg",
        "peft_kind": "lora",
        "emulator_levels": [1],
    }
    assert configs["fed_full_adapter"]["peft_kind"] == "full" and configs["local_lora"]["algorithm"] == "local"
    assert (
        configs["fed_lora_full_model"]["trainable"] == "all_blocks" and configs["fed_full_ft"]["trainable"] == "model"
    )
    assert configs["fed_full_ft"]["emulator_levels"] == [2]  # the whole middle of the 6-block model
    cfg = res["config"]
    assert cfg["preset"] == "tiny" and cfg["k"] == 1 and cfg["methods"] == METHODS
    assert res["emulator"]["name"] == "2-1-2" and res["emulator"]["middle_ids"] == [2]
    m = res["methods"]
    assert list(m) == METHODS
    for name, r in m.items():
        for key in (
            "final_ppl",
            "curve",
            "trainable_params",
            "on_device_params",
            "bytes_up_per_device_per_round",
            "bytes_down_per_device_per_round",
            "one_time_download_bytes",
            "peak_step_memory_mb",
            "step_memory",
            "flops_per_client_per_round",
            "round_seconds_median",
            "mec",
        ):
            assert key in r, (name, key)
        assert len(r["round_seconds"]) == cfg["rounds"] and min(r["round_seconds"]) > 0
        # Every method starts at the foundation model (LoRA's B = 0, tuned weights copied) and is
        # evaluated before the first round and after every round (eval_every 1).
        assert [p["round"] for p in r["curve"]] == list(range(cfg["rounds"] + 1))
        assert math.isclose(r["curve"][0]["ppl"], res["zero_shot_ppl"], rel_tol=1e-4), name
        assert all(math.isfinite(p["ppl"]) for p in r["curve"]) and r["final_ppl"] == r["curve"][-1]["ppl"]
        assert r["final_ppl"] != res["zero_shot_ppl"], f"{name} did not move the model"
        assert r["mec"]["first_round_latency_s"] > r["mec"]["latency_s"] > 0

    # Parameter counts from the configs' closed forms.
    model = GPT2Config.preset("tiny")
    adapter = PeftConfig(kind="lora", lora_rank=cfg["lora_rank"], lora_alpha=cfg["lora_alpha"], layers=(0, 1, 4, 5))
    assert m["fedpeat_lora"]["trainable_params"] == adapter.param_count(model)
    assert m["fed_lora_full_model"]["trainable_params"] == adapter.replace(layers=None).param_count(model)
    assert m["fed_full_adapter"]["trainable_params"] == 4 * model.block_param_count()
    assert m["fed_full_ft"]["trainable_params"] == m["fed_full_ft"]["on_device_params"] == model.param_count()
    emulator = model.param_count() - model.block_param_count()  # 2-1-2 of a 6-block model drops one block
    assert m["fedpeat_lora"]["on_device_params"] == emulator + m["fedpeat_lora"]["trainable_params"]
    assert m["fed_full_adapter"]["on_device_params"] == emulator

    # Communication: float32 trained parameters, both ways; LoRA < full adapter < full fine-tuning.
    up = {k: r["bytes_up_per_device_per_round"] for k, r in m.items()}
    for k in ("fedpeat_lora", "fed_full_adapter", "fed_lora_full_model", "fed_full_ft"):
        assert up[k] == m[k]["bytes_down_per_device_per_round"] == 4 * m[k]["trainable_params"]
    assert up["local_lora"] == m["local_lora"]["bytes_down_per_device_per_round"] == 0
    assert up["fedpeat_lora"] < up["fed_lora_full_model"] < up["fed_full_adapter"] < up["fed_full_ft"]
    assert m["fed_full_ft"]["one_time_download_bytes"] == 0
    assert m["fedpeat_lora"]["one_time_download_bytes"] < m["fed_lora_full_model"]["one_time_download_bytes"]

    # Memory and compute: the emulator holds and computes less than the full model.
    mem = {k: r["peak_step_memory_mb"] for k, r in m.items()}
    assert mem["local_lora"] == mem["fedpeat_lora"] < mem["fed_lora_full_model"] < mem["fed_full_ft"]
    assert mem["fedpeat_lora"] < mem["fed_full_adapter"] < mem["fed_full_ft"]
    assert m["fedpeat_lora"]["on_device_params"] < m["fed_lora_full_model"]["on_device_params"]
    flops = {k: r["flops_per_client_per_round"] for k, r in m.items()}
    assert flops["local_lora"] == flops["fedpeat_lora"] < flops["fed_full_adapter"] < flops["fed_full_ft"]
    assert flops["fedpeat_lora"] < flops["fed_lora_full_model"] < flops["fed_full_ft"]
    lat = {k: r["mec"]["latency_s"] for k, r in m.items()}
    assert lat["local_lora"] < lat["fedpeat_lora"] < lat["fed_full_adapter"] < lat["fed_full_ft"]
    assert m["local_lora"]["mec"]["upload_s"] == 0

    # Local-only: each evaluated client has its own model.
    clients = m["local_lora"]["runs"][0]["curve"][-1]["client_ppl"]
    assert len(clients) == cfg["local_eval_clients"] and len(set(clients)) == len(clients)
    assert math.isclose(np.mean(clients), m["local_lora"]["final_ppl"], rel_tol=1e-9)

    md = out.with_name("study.md").read_text()
    assert "| method | trainable params | plug-in ppl |" in md and "Plug-in perplexity over rounds" in md
    assert "load average" in md and "MEC latency" in md
    for r in m.values():
        assert r["label"] in md
    assert out.with_name("study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
