"""Shared helpers for the benchmark scripts: machine description, timing, matmul peak, result files.

Timing follows the project's benchmark hygiene: compile time is measured on its own (`compile_jax`),
every timed call is synchronized before the clock stops (`block_until_ready` for JAX; torch on CPU
is synchronous, on CUDA `torch_sync` waits for the device), and the reported figure is the median of
several runs after warm-up. Results are written as benchmarks/results/NAME.json (everything) and
NAME.md (a table for humans); set FEDPEAT_RESULTS_DIR to write them to another folder (results from
another machine, e.g. FEDPEAT_RESULTS_DIR=benchmarks/results/h200 on a GPU).

    from benchmarks.common import compile_jax, machine_info, matmul_peak, median_time, write_json
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedpeat_jax.io.machine import machine_info  # noqa: F401 - re-exported for the benchmark scripts

RESULTS_DIR = Path(os.environ.get("FEDPEAT_RESULTS_DIR") or Path(__file__).resolve().parent / "results").resolve()
LOADED = 2.5  # a 1-minute load average above this means other jobs shared the machine


def hardware(info: dict) -> str:
    """Where a benchmark's JAX code ran, in words, for the notes of its table: the CPU model and its
    usable cores, or on an accelerator its name (jax's device_kind) and the host CPU beside it."""
    cpu = f"{info['cpu_model']}, {info.get('cpus_usable') or info.get('cpu_count')} usable cores"
    if info.get("jax_backend", "cpu") == "cpu":
        return cpu
    n = len(info.get("jax_devices") or [None])
    kind = info.get("jax_device_kind") or info["jax_backend"]
    return f"{n} x {kind} (jax backend {info['jax_backend']}); host CPU {cpu}"


def add_torch_device_argument(parser, what: str) -> None:
    """The scripts' ``--torch-device`` option: where ``what`` (their torch baseline) runs."""
    parser.add_argument(
        "--torch-device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help=f"where {what} runs (auto: cuda when torch sees it)",
    )


def torch_device(choice: str = "auto") -> str:
    """'cuda' when asked, or for 'auto' when torch sees a CUDA device; else 'cpu'."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--torch-device cuda, but torch sees no CUDA device")
    return choice


def torch_sync(device: str) -> Callable[[Any], Any]:
    """The `sync` for `median_time` of torch code on `device`: CUDA kernels run asynchronously."""
    if device != "cuda":
        return lambda out: out
    import torch

    def sync(out):
        torch.cuda.synchronize()
        return out

    return sync


def under_load(*loads: float) -> bool:
    """Whether any of these 1-minute load averages says the timings were shared with other jobs."""
    return max(loads) > LOADED


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def compile_jax(fn: Callable, *args, **kwargs):
    """(compiled, seconds): ahead-of-time lower + compile of a `jax.jit`-ed fn for these args."""
    start = time.perf_counter()
    compiled = fn.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - start


def median_time(
    fn: Callable,
    *args,
    runs: int = 5,
    warmup: int = 1,
    sync: Callable[[Any], Any] = jax.block_until_ready,
) -> dict:
    """Median wall time of `sync(fn(*args))` over `runs` calls after `warmup` untimed ones.

    `sync` waits for the result (JAX dispatches asynchronously); pass `lambda out: out` for code
    that is already synchronous, such as torch on CPU.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    for _ in range(warmup):
        sync(fn(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sync(fn(*args))
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs_s": times}


# --------------------------------------------------------------------------------------------
# Dense matmul peak
# --------------------------------------------------------------------------------------------
def default_matmul_n() -> int:
    """The peak matmul's size: 2048 on a CPU; 8192 on an accelerator, where a 2048^3 product takes
    tens of microseconds and its launch would weigh in the figure."""
    return 2048 if jax.default_backend() == "cpu" else 8192


def matmul_peak(dtype: str = "float32", n: int | None = None, runs: int = 5) -> dict:
    """Achieved FLOP/s of a jitted (n x n) @ (n x n) matmul in `dtype` (2 n^3 FLOPs per call);
    bfloat16 operands accumulate into a float32 result, the kernel `gpt2.matmul` runs in bfloat16
    compute (with AVX512-BF16 it is the fastest bfloat16 matmul XLA's CPU backend has). float32 at
    JAX's default matmul precision, the one the models run at (on an NVIDIA GPU XLA may use TF32).
    n: `default_matmul_n()` when None.

    The reference for model FLOP utilization: what this machine's XLA backend reaches on the
    friendliest dense kernel, measured in the same run as the model.
    """
    n = n or default_matmul_n()
    rs = np.random.RandomState(0)
    a = jnp.asarray(rs.standard_normal((n, n)), dtype)
    b = jnp.asarray(rs.standard_normal((n, n)), dtype)
    matmul, compile_s = compile_jax(jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32)), a, b)
    timing = median_time(matmul, a, b, runs=runs, warmup=1)
    flops = 2.0 * n**3
    return {
        "dtype": dtype,
        "n": n,
        "flops_per_call": flops,
        "flops_per_s": flops / timing["median_s"],
        "compile_s": compile_s,
        **timing,
    }


def best_peaks(measurements: list) -> dict:
    """Per kind, the highest of repeated peak measurements ({kind: matmul_peak(...)} dicts): other
    load can only lower a measurement, so the maximum is the closest to the machine's real peak."""
    return {k: max((m[k] for m in measurements), key=lambda r: r["flops_per_s"]) for k in measurements[0]}


def torch_matmul_peak(n: int | None = None, runs: int = 5, device: str = "cpu") -> dict:
    """The same float32 measurement for torch (its kernels are not XLA's), on `device` (torch's
    default float32 matmul precision)."""
    import torch

    n = n or default_matmul_n()
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    timing = median_time(torch.matmul, a, b, runs=runs, warmup=1, sync=torch_sync(device))
    flops = 2.0 * n**3
    return {
        "dtype": "float32",
        "n": n,
        "device": device,
        "flops_per_call": flops,
        "flops_per_s": flops / timing["median_s"],
        **timing,
    }


# --------------------------------------------------------------------------------------------
# The PyTorch twin of an emulator with LoRA (the baselines' client model)
# --------------------------------------------------------------------------------------------
def torch_lora_emulator(params, cfg, spec, rank: int, threads: int | None = None):
    """A transformers GPT2LMHeadModel holding `spec`'s emulator of `params`, with an HF peft LoRA
    of rank `rank` (alpha 2 * rank, no dropout) on the four dense layers of the adapter blocks:
    the same trainable parameters as fedpeat_jax's LoRA on that emulator. In train mode."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    from fedpeat_jax.model import hf
    from fedpeat_jax.peat.emulator import build

    if threads is not None:
        torch.set_num_threads(threads)
    model = GPT2LMHeadModel(hf.to_hf_config(spec.emulator_config(cfg)))
    state = {
        k: torch.as_tensor(np.array(v, np.float32)) for k, v in hf.state_dict_from_params(build(params, spec)).items()
    }
    model.load_state_dict(state, strict=False)  # the tied lm_head follows wte
    lora = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
        layers_to_transform=list(spec.emulator_adapter_ids),
        lora_dropout=0.0,
    )
    model = get_peft_model(model, lora)
    model.train()
    return model


# --------------------------------------------------------------------------------------------
# Result files
# --------------------------------------------------------------------------------------------
def write_json(name: str, data: dict) -> Path:
    """benchmarks/results/NAME.json (written to a temp file, then renamed: never half-written)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def _jsonable(x):
    if isinstance(x, (np.generic, jax.Array)):
        return np.asarray(x).tolist()
    raise TypeError(f"cannot write {type(x).__name__} to JSON")


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
        return str(x)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(
    name: str, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], notes: Sequence[str] = ()
) -> Path:
    """benchmarks/results/NAME.md: a title, one table, and notes (formulas, machine, caveats)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.md"
    text = f"# {title}\n\n{markdown_table(columns, rows)}\n"
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    path.write_text(text)
    return path


__all__ = [
    "LOADED",
    "RESULTS_DIR",
    "under_load",
    "hardware",
    "machine_info",
    "add_torch_device_argument",
    "torch_device",
    "torch_sync",
    "default_matmul_n",
    "compile_jax",
    "median_time",
    "matmul_peak",
    "best_peaks",
    "torch_matmul_peak",
    "torch_lora_emulator",
    "write_json",
    "write_markdown",
    "markdown_table",
]
