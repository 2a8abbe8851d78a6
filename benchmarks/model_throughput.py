"""Forward+backward throughput of our GPT-2 against transformers' PyTorch GPT-2, same config and batch.

    python -m benchmarks.model_throughput            # tiny, default, gpt2 (about 8 minutes on 2 cores)
    python -m benchmarks.model_throughput --cases tiny --runs 3
    FEDPEAT_RESULTS_DIR=benchmarks/results/h200 python -m benchmarks.model_throughput --batch-mult 16
                                                      # on a GPU: 16x the batches, torch on CUDA

One training step = loss over every position and gradients of *all* parameters:
  ours:  jax.jit(jax.value_and_grad(gpt2.loss(params, ids)))  in the variants of VARIANTS: float32;
         the loss through full logits (gpt2.apply + lm_loss, the formulation before gpt2.loss);
         attention by jax.nn.dot_product_attention; gradient checkpointing (remat); bfloat16 compute
  torch: model(ids, labels=ids).loss.backward() with torch.set_num_threads(all cores), on torch's
         CUDA device when it sees one (--torch-device)
Both start from the same weights (ours are converted from the torch model), dropout is off, and the
losses are checked to agree (1e-3; bfloat16 within 2%; float32 on an accelerator, where XLA's default
matmul precision may be TF32 and torch's is full float32, within 0.5%). Reported: median tokens/s over several
timed runs after warm-up (compile time separately), the ratio ours / torch, model FLOP utilization
(MFU) against the dense-matmul peak of the same dtype measured in this same run, and XLA's compiled
temporary memory of the step (what remat lowers).

FLOPs per step (counted in full, causal masking not halved, as in PaLM's MFU):
  6 * N * tokens  +  12 * n_layer * T * n_embd * tokens,
  N = n_layer * block_params + vocab_size * n_embd  (every weight that takes part in a matmul: the
  blocks and the tied LM head; the embedding lookups are gathers, not matmuls),
  12 * n_layer * T * d per token = fwd (QK^T and AV: 4 T d) x 3 for fwd + bwd.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runnable as a plain script

import jax
import numpy as np

from benchmarks.common import (
    RESULTS_DIR,
    add_torch_device_argument,
    best_peaks,
    compile_jax,
    default_matmul_n,
    hardware,
    machine_info,
    matmul_peak,
    median_time,
    torch_device,
    torch_matmul_peak,
    torch_sync,
    write_json,
    write_markdown,
)
from fedpeat_jax.config import GPT2Config
from fedpeat_jax.model import gpt2, hf
from fedpeat_jax.model.flops import matmul_param_count, train_flops_per_token

NAME = "model_throughput"
# preset -> (batch, seq_len, timed runs). gpt2 small runs a small batch and fewer runs so that the
# whole script stays near 3 minutes on 2 cores.
CASES = {"tiny": (16, 64, 5), "default": (8, 256, 5), "gpt2": (2, 128, 3)}


def step_flops(cfg: GPT2Config, batch: int, seq: int) -> dict:
    n_matmul = matmul_param_count(cfg, cfg.n_layer)
    tokens = batch * seq
    total = tokens * train_flops_per_token(cfg, cfg.n_layer, seq, trained_matmul=n_matmul)  # every weight trained
    dense = 6.0 * n_matmul * tokens
    return {"matmul_params": n_matmul, "tokens": tokens, "dense": dense, "attention": total - dense, "total": total}


# name -> (GPT2Config changes, loss formulation)
VARIANTS = {
    "ours_float32": ({}, "hidden"),
    "ours_float32_logits_loss": ({}, "logits"),
    "ours_float32_dot_product": ({"attention": "dot_product"}, "hidden"),
    "ours_float32_remat": ({"remat": True}, "hidden"),
    "ours_bfloat16": ({"dtype": "bfloat16"}, "hidden"),
}


def bench_jax(params, ids, cfg: GPT2Config, loss_kind: str, runs: int) -> dict:
    def loss_fn(p, ids):
        if loss_kind == "logits":
            return gpt2.lm_loss(gpt2.apply(p, ids, config=cfg), ids)
        return gpt2.loss(p, ids, config=cfg)

    step, compile_s = compile_jax(jax.jit(jax.value_and_grad(loss_fn)), params, ids)
    memory = step.memory_analysis()
    loss = float(step(params, ids)[0])  # doubles as the warm-up run
    return {
        "compile_s": compile_s,
        "loss": loss,
        "temp_bytes": None if memory is None else int(memory.temp_size_in_bytes),
        "dtype": cfg.dtype,
        **median_time(step, params, ids, runs=runs, warmup=0),
    }


def bench_torch(model, ids: np.ndarray, runs: int, device: str = "cpu") -> dict:
    import torch

    ids_t = torch.as_tensor(ids, device=device)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(ids_t, labels=ids_t)
        out.loss.backward()
        return out.loss.detach()

    loss = float(step())  # doubles as the warm-up run
    return {"loss": loss, **median_time(step, runs=runs, warmup=0, sync=torch_sync(device))}


def measure_peaks(n: int, runs: int, device: str = "cpu") -> dict:
    return {
        "jax_float32": matmul_peak("float32", n, runs),
        "jax_bfloat16": matmul_peak("bfloat16", n, runs),
        "torch_float32": torch_matmul_peak(n, runs, device),
    }


def float32_tolerance(ref_loss: float) -> float:
    """How far a float32 step's loss may lie from torch's: 1e-3 on a CPU; 0.5% on an accelerator,
    where XLA's default float32 matmul precision may be TF32 and torch's is full float32."""
    return 1e-3 if jax.default_backend() == "cpu" else 5e-3 * ref_loss


def run_case(name: str, batch: int, seq: int, runs: int, device: str = "cpu") -> tuple:
    import torch
    from transformers import GPT2LMHeadModel

    cfg = GPT2Config.preset(name, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(hf.to_hf_config(cfg))  # default attention implementation (SDPA)
    params, _ = hf.from_torch_model(model)  # the very same weights on our side
    model = model.to(device)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
    flops = step_flops(cfg, batch, seq)
    print(
        f"[{name}] params={cfg.param_count():,} batch={batch} seq={seq} GFLOP/step={flops['total'] / 1e9:.2f}",
        flush=True,
    )

    results = {"torch_float32": bench_torch(model.train(), ids.astype(np.int64), runs, device) | {"dtype": "float32"}}
    for impl, (changes, loss_kind) in VARIANTS.items():
        results[impl] = bench_jax(params, ids, cfg.replace(**changes), loss_kind, runs)
        ref = results["torch_float32"]["loss"]
        gap = abs(results[impl]["loss"] - ref)
        results[impl]["loss_gap"] = gap
        tolerance = float32_tolerance(ref) if results[impl]["dtype"] == "float32" else 2e-2 * ref
        if gap > tolerance:
            raise RuntimeError(f"[{name}] {impl}'s loss and torch's differ by {gap:.3g}: not the same computation")
    for impl, r in results.items():
        print(
            f"  {impl:26s} {flops['tokens'] / r['median_s']:10.0f} tok/s  compile {r.get('compile_s') or 0:.1f}s",
            flush=True,
        )
    return cfg, flops, results


def make_rows(name, batch, seq, cfg, flops, results, peaks) -> list:
    torch_tps = flops["tokens"] / results["torch_float32"]["median_s"]
    rows = []
    for impl, r in results.items():
        dtype = r["dtype"]
        tps = flops["tokens"] / r["median_s"]
        row = {
            "case": name,
            "impl": impl,
            "dtype": dtype,
            "batch": batch,
            "seq": seq,
            "params": cfg.param_count(),
            "tokens_per_step": flops["tokens"],
            "flops_per_step": flops["total"],
            "median_s": r["median_s"],
            "tokens_per_s": tps,
            "ratio_vs_torch_float32": tps / torch_tps,
            "achieved_flops_per_s": flops["total"] / r["median_s"],
            "mfu_vs_jax_peak": flops["total"] / r["median_s"] / peaks["jax_" + dtype]["flops_per_s"],
            "peak_used": "jax_" + dtype,
            "loss": r["loss"],
            "loss_gap_vs_torch": r.get("loss_gap"),
            "compile_s": r.get("compile_s"),
            "temp_bytes": r.get("temp_bytes"),
            "runs": len(r["runs_s"]),
            "runs_s": r["runs_s"],
        }
        if impl.startswith("torch"):
            row["mfu_vs_torch_peak"] = flops["total"] / r["median_s"] / peaks["torch_float32"]["flops_per_s"]
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument(
        "--runs",
        type=int,
        default=0,
        help="timed runs per measurement (median reported); 0: per-case defaults (5, gpt2: 3)",
    )
    parser.add_argument(
        "--matmul-n", type=int, default=0, help="size of the peak-FLOP/s matmul (0: 2048 on a CPU, 8192 elsewhere)"
    )
    parser.add_argument(
        "--batch-mult", type=int, default=1, help="multiply every case's batch (larger batches for accelerators)"
    )
    add_torch_device_argument(parser, "the torch model")
    args = parser.parse_args(argv)
    args.matmul_n = args.matmul_n or default_matmul_n()

    import torch

    torch.set_num_threads(os.cpu_count())
    device = torch_device(args.torch_device)
    start = time.perf_counter()
    info = machine_info()
    info["torch_threads"] = torch.get_num_threads()
    info["torch_device"] = device
    # The peaks are measured before every case and at the end; MFU uses the best of them.
    peak_runs, cases = [], []
    for name in args.cases:
        peak_runs.append(measure_peaks(args.matmul_n, args.runs or 5, device))
        batch, seq, runs = CASES[name]
        batch *= args.batch_mult
        cases.append((name, batch, seq, *run_case(name, batch, seq, args.runs or runs, device)))
    peak_runs.append(measure_peaks(args.matmul_n, args.runs or 5, device))
    peaks = best_peaks(peak_runs)
    for k, v in peaks.items():
        print(f"peak {k}: {v['flops_per_s'] / 1e9:.1f} GFLOP/s (best of {len(peak_runs)})", flush=True)
    rows = [row for case in cases for row in make_rows(*case, peaks)]
    for r in rows:
        print(
            f"{r['case']:8s} {r['impl']:26s} {r['tokens_per_s']:10.0f} tok/s  x{r['ratio_vs_torch_float32']:.2f} "
            f"vs torch  MFU {100 * r['mfu_vs_jax_peak']:.1f}%"
        )
    info["loadavg_end_1_5_15"] = list(os.getloadavg())
    info["total_s"] = time.perf_counter() - start

    write_json(
        NAME,
        {
            "benchmark": NAME,
            "what": "GPT-2 forward+backward (loss and grads of all params) tokens/s: fedpeat_jax vs transformers (PyTorch)",
            "flops_formula": "6 * N * tokens + 12 * n_layer * seq * n_embd * tokens; "
            "N = n_layer * block_params + vocab_size * n_embd (matmul weights incl. tied head)",
            "machine": info,
            "matmul_peaks": peaks,
            "matmul_peak_measurements": peak_runs,
            "results": rows,
        },
    )
    table = [
        (
            r["case"],
            r["impl"],
            f"{r['batch']}x{r['seq']}",
            f"{r['params'] / 1e6:.2f}M",
            r["tokens_per_s"],
            f"{r['ratio_vs_torch_float32']:.2f}",
            f"{r['achieved_flops_per_s'] / 1e9:.1f}",
            f"{100 * r['mfu_vs_jax_peak']:.1f}%",
            "" if r["compile_s"] is None else f"{r['compile_s']:.1f}",
            "" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.0f}",
        )
        for r in rows
    ]
    load = ", ".join(f"{x:.2f}" for x in info["loadavg_1_5_15"])

    def gflops(kind):
        return peaks[kind]["flops_per_s"] / 1e9

    notes = [
        f"Machine: {hardware(info)}, jax {info['jax']} "
        f"({info['jax_backend']}), torch {info['torch']} "
        f"({'on cuda' if device == 'cuda' else str(info['torch_threads']) + ' threads'}), "
        f"transformers {info['transformers']}.",
        f"Load average at start (1/5/15 min): {load}; at end: "
        + ", ".join(f"{x:.2f}" for x in info["loadavg_end_1_5_15"])
        + " (other work on the machine lowers every number).",
        f"Dense matmul peak (jitted {args.matmul_n}^3 matmul, median): JAX float32 {gflops('jax_float32'):.1f}, "
        f"JAX bfloat16 {gflops('jax_bfloat16'):.1f}, torch float32 {gflops('torch_float32'):.1f} GFLOP/s "
        "(best of the measurements taken before each case and at the end).",
        "MFU = FLOPs per step / median step time / the JAX matmul peak of the same dtype (bfloat16: bfloat16 "
        "operands, float32 accumulation, the kernel bfloat16 compute runs); "
        "FLOPs = 6 N tokens + 12 n_layer T d tokens, N = matmul weights (blocks + tied LM head).",
        "Variants: float32_logits_loss = the loss through full logits and a one-hot (before gpt2.loss); "
        "dot_product = GPT2Config.attention='dot_product'; remat = GPT2Config.remat (XLA temp MiB: the "
        "compiled step's temporaries, activations included).",
        f"Median of {'/'.join(sorted({str(r['runs']) for r in rows}))} timed steps per row after one warm-up; "
        "compile time measured separately (AOT lower+compile). Dropout off; both sides start from the same "
        "weights and their losses agree to "
        + (
            "1e-3 (bfloat16: 2%)."
            if info["jax_backend"] == "cpu"
            else "0.5% in float32 (XLA's default float32 matmul precision may be TF32 here, torch's is full "
            "float32) and 2% in bfloat16; the largest gap in this run: "
            + f"{max(r['loss_gap_vs_torch'] or 0.0 for r in rows):.2g}."
        ),
    ]
    if info["jax_backend"] == "cpu" and max(info["loadavg_1_5_15"][0], info["loadavg_end_1_5_15"][0]) > (
        0.5 * info["cpus_usable"]
    ):
        notes.insert(
            0,
            "**Measured on a busy machine** (1-min load above half the cores): other processes shared "
            "the CPU, torch's threads suffer most from that; re-run on a quiet machine before quoting.",
        )
    write_markdown(
        NAME,
        "GPT-2 forward+backward throughput: fedpeat_jax vs transformers (PyTorch)",
        [
            "case",
            "impl",
            "batch x seq",
            "params",
            "tokens/s",
            "x torch fp32",
            "GFLOP/s",
            "MFU",
            "compile s",
            "XLA temp MiB",
        ],
        table,
        notes,
    )
    print(f"wrote {RESULTS_DIR}/{NAME}.json and .md in {info['total_s']:.0f}s")


if __name__ == "__main__":
    main()
