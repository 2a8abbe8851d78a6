"""Throughput of one FedPEAT round: vectorized clients against the two ways frameworks simulate.

    python -m benchmarks.fl_throughput                 # default + tiny foundation shapes (~15 min on 2 cores)
    python -m benchmarks.fl_throughput --quick         # fewer client counts and runs
    FEDPEAT_RESULTS_DIR=benchmarks/results/h200 python -m benchmarks.fl_throughput --clients 1,8,64,256,1024
                                                       # on a GPU (results beside the CPU ones)

One round = m clients, each doing S local Adam steps of LoRA (r=8, on the adapter blocks) on a
2-k-2 emulator of the foundation model, with a batch of b sequences of T tokens, then FedAvg.
The same round is run three ways, on identical work, in the same process:

  vectorized  FedPEAT.round: clients vmapped inside one jitted call (this project);
  jax loop    a Python loop over clients, each a jitted `local_train` call, then a jitted
              FedAvg: how FedJAX simulates;
  torch loop  one transformers GPT2LMHeadModel (the emulator) with a peft LoRA; for each client
              the global LoRA is loaded, a fresh Adam runs S steps, the LoRA is read back; then
              the mean: how PyTorch federated-LLM frameworks (OpenFedLLM, FederatedScope-LLM)
              simulate. On torch's CUDA device when it sees one (--torch-device).

FLOPs per client step (frozen base: the backward pass computes activation gradients only):
  4 * N * tokens + 12 * L * T * d * tokens + LoRA (6 * r * sum(in + out) per token),
  N = matmul weights of the emulator (its blocks and the tied LM head), L its depth.
MFU = FLOPs / time / the dense-matmul peak of the same dtype measured in this run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runnable as a plain script

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
    add_torch_device_argument,
    compile_jax,
    hardware,
    machine_info,
    matmul_peak,
    median_time,
    torch_device,
    torch_sync,
    write_json,
    write_markdown,
)
from fedpeat_jax.config import FedConfig, GPT2Config, PeftConfig
from fedpeat_jax.fed import aggregate
from fedpeat_jax.fed.client import Hyper, local_update
from fedpeat_jax.fed.simulation import FedData, FedPEAT
from fedpeat_jax.model import gpt2
from fedpeat_jax.model.flops import train_flops_per_token

NAME = "fl_throughput"
RANK, LOCAL_STEPS = 8, 4
ADAPTER_LORA = PeftConfig(kind="lora", lora_rank=RANK, layers=(0, 1, 2, 3))  # the 2 + 2 adapter blocks


def foundation_params(preset: str):
    """The cached foundation model of `preset` when there is one, else random weights of its
    shape (throughput does not depend on the values)."""
    cfg = GPT2Config.preset(preset, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    try:
        from fedpeat_jax.peat.foundation import load_foundation

        found = load_foundation(preset, allow_pretrain=False)
        return found.params, cfg, "pretrained foundation model"
    except Exception:  # noqa: BLE001 - not cached: random weights of the same shape
        return gpt2.init(jax.random.key(0), cfg), cfg, "random weights of the preset's shape"


def make_sim(params, cfg: GPT2Config, m: int, batch: int, dtype: str, chunk=None):
    model = cfg.replace(dtype=dtype)
    fed = FedConfig(
        clients_per_round=m,
        local_steps=LOCAL_STEPS,
        local_batch=batch,
        emulator_levels=(2,),
        log_lora_gap=False,
        client_chunk=chunk,
    )
    peft = PeftConfig(kind="lora", lora_rank=RANK, lora_alpha=2.0 * RANK)
    return FedPEAT(model, peft, fed, n_clients=m)


def client_data(m: int, batch: int, seq: int, vocab: int) -> FedData:
    n = batch * LOCAL_STEPS  # every client holds exactly one epoch of local batches
    tokens = np.random.RandomState(0).randint(0, vocab, (m, n, seq))
    return FedData.from_arrays(tokens, np.ones((m, n, seq)), np.full(m, n))


def flops_per_client_step(cfg: GPT2Config, depth: int, batch: int, seq: int) -> float:
    return batch * seq * train_flops_per_token(cfg, depth, seq, lora_params=ADAPTER_LORA.param_count(cfg))


# --------------------------------------------------------------------------------------------
# The three implementations
# --------------------------------------------------------------------------------------------
def bench_vectorized(sim: FedPEAT, params, data: FedData, runs: int) -> dict:
    state = sim.init(jax.random.key(0), params)
    hyper = Hyper.from_config(sim.fed)
    round_fn = jax.jit(lambda s, p, d: sim.round(s, p, d, hyper))
    compiled, compile_s = compile_jax(round_fn, state, params, data)
    memory = compiled.memory_analysis()
    timing = median_time(compiled, state, params, data, runs=runs, warmup=1)
    peak = None
    if memory is not None:
        peak = int(memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes)
    return {"compile_s": compile_s, "peak_bytes": peak, **timing}


def bench_jax_loop(sim: FedPEAT, params, data: FedData, runs: int) -> dict:
    """FedJAX-style: a jitted per-client update called in a Python loop, then a jitted mean."""
    state = sim.init(jax.random.key(0), params)
    hyper = Hyper.from_config(sim.fed)
    base = sim.learner.frozen(params, 0)
    loss = sim.learner.loss(0)
    one = jax.jit(
        lambda tok, msk, cnt, key: (
            local_update(
                lambda t, x, m, k: loss(t, base, x, m, k),
                state.trainable,
                state.trainable,
                tok,
                msk,
                cnt,
                key,
                hyper,
                fed=sim.fed,
                batch=sim.fed.local_batch,
            ).tree
        )
    )
    mean = jax.jit(
        lambda clients, counts: aggregate.fedavg(aggregate.client_deltas(clients, state.trainable), counts).mean
    )
    m = data.tokens.shape[0]
    keys = jax.random.split(jax.random.key(1), m)
    _, compile_s = compile_jax(one, data.tokens[0], data.mask[0], data.counts[0], keys[0])

    def round_():
        clients = [one(data.tokens[i], data.mask[i], data.counts[i], keys[i]) for i in range(m)]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *clients)
        return mean(stacked, data.counts.astype(jnp.float32))

    return {"compile_s": compile_s, **median_time(round_, runs=runs, warmup=1)}


def bench_torch_loop(params, cfg: GPT2Config, data: FedData, batch: int, runs: int, device: str = "cpu") -> dict:
    """A sequential PyTorch + peft round on the same emulator, batches and LoRA, on torch's `device`."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from fedpeat_jax.model import hf
    from fedpeat_jax.peat.emulator import EmulatorSpec, build

    torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
    spec = EmulatorSpec(cfg.n_layer, 2, 2, 2)
    emu_cfg = spec.emulator_config(cfg)
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(hf.to_hf_config(emu_cfg))
    state_dict = {k: torch.as_tensor(np.asarray(v)) for k, v in hf.state_dict_from_params(build(params, spec)).items()}
    model.load_state_dict(state_dict, strict=False)
    lora = LoraConfig(
        r=RANK,
        lora_alpha=2 * RANK,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
        layers_to_transform=list(spec.emulator_adapter_ids),
        lora_dropout=0.0,
    )
    model = get_peft_model(model, lora).to(device)
    model.train()
    global_lora = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    tokens = torch.as_tensor(np.asarray(data.tokens), dtype=torch.long, device=device)
    m = tokens.shape[0]

    def round_():
        uploads = []
        for c in range(m):
            set_peft_model_state_dict(model, global_lora)
            opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            order = torch.randperm(tokens.shape[1], device=device)
            for s in range(LOCAL_STEPS):
                ids = tokens[c, order[s * batch : (s + 1) * batch]]
                opt.zero_grad(set_to_none=True)
                model(ids, labels=ids).loss.backward()
                opt.step()
            uploads.append({k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()})
        return {k: torch.stack([u[k] for u in uploads]).mean(0) for k in global_lora}

    return median_time(round_, runs=runs, warmup=1, sync=torch_sync(device))


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def run_case(
    preset: str,
    counts: list,
    head_m: int,
    batch: int,
    seq: int,
    runs: int,
    peaks: dict,
    baselines: bool,
    device: str = "cpu",
) -> dict:
    params, cfg, weights = foundation_params(preset)
    depth = 6
    step_flops = flops_per_client_step(cfg, depth, batch, seq)
    rows = []
    for dtype in ("float32", "bfloat16"):
        for m in counts if dtype == "float32" else [head_m]:
            sim = make_sim(params, cfg, m, batch, dtype)
            data = client_data(m, batch, seq, cfg.vocab_size)
            try:
                vec = bench_vectorized(sim, params, data, runs if m <= 256 else 1)
            except Exception as e:  # noqa: BLE001 - out of memory ends the sweep
                print(f"  {preset} m={m} {dtype}: stopped ({type(e).__name__}: {str(e)[:120]})")
                break
            flops = step_flops * m * LOCAL_STEPS
            row = {
                "preset": preset,
                "dtype": dtype,
                "clients": m,
                "batch": batch,
                "seq": seq,
                "local_steps": LOCAL_STEPS,
                "vectorized_s": vec["median_s"],
                "rounds_per_s": 1.0 / vec["median_s"],
                "client_steps_per_s": m * LOCAL_STEPS / vec["median_s"],
                "compile_s": vec["compile_s"],
                "peak_bytes": vec["peak_bytes"],
                "flops_per_round": flops,
                "mfu": flops / vec["median_s"] / peaks[dtype]["flops_per_s"],
            }
            if baselines and m == head_m:
                loop = bench_jax_loop(sim, params, data, max(1, runs // 2))
                row["jax_loop_s"] = loop["median_s"]
                row["speedup_vs_jax_loop"] = loop["median_s"] / vec["median_s"]
                if dtype == "float32":
                    torch_t = bench_torch_loop(params, cfg, data, batch, max(1, runs // 2), device)
                    row["torch_loop_s"] = torch_t["median_s"]
                    row["speedup_vs_torch_loop"] = torch_t["median_s"] / vec["median_s"]
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    fp32 = [r for r in rows if r["dtype"] == "float32" and r["peak_bytes"]]
    per_client = None
    if len(fp32) >= 2:
        per_client = (fp32[-1]["peak_bytes"] - fp32[0]["peak_bytes"]) / (fp32[-1]["clients"] - fp32[0]["clients"])
    return {
        "preset": preset,
        "weights": weights,
        "model": cfg.__dict__,
        "emulator": "2-2-2",
        "rows": rows,
        "peak_bytes_per_added_client": per_client,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,default")
    parser.add_argument("--max-clients", type=int, default=1024)
    parser.add_argument("--head-clients", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--clients",
        type=lambda text: sorted({int(x) for x in text.split(",")}),
        help="comma-separated clients per round for the float32 sweep (overrides --max-clients and --quick)",
    )
    add_torch_device_argument(parser, "the torch+peft baseline")
    args = parser.parse_args(argv)
    counts = [2**i for i in range(0, 11) if 2**i <= args.max_clients]
    if args.quick:
        counts = [c for c in counts if c in (1, 8, 64, 256)]
    counts = args.clients or counts
    device = torch_device(args.torch_device)
    peaks = {dtype: matmul_peak(dtype) for dtype in ("float32", "bfloat16")}
    cases = []
    for preset in args.presets.split(","):
        cases.append(run_case(preset, counts, args.head_clients, 2, 64, args.runs, peaks, True, device))
        # Large local batches: fewer clients, 16 sequences per step.
        cases.append(run_case(preset, [16], 16, 16, 64, args.runs, peaks, True, device) | {"large_batch": True})
    result = {
        "machine": machine_info() | {"torch_device": device},
        "matmul_peak": peaks,
        "cases": cases,
        "lora_rank": RANK,
        "local_steps": LOCAL_STEPS,
    }
    write_json(NAME, result)
    table = []
    for case in cases:
        for r in case["rows"]:
            table.append(
                [
                    r["preset"],
                    r["dtype"],
                    r["clients"],
                    f"{r['batch']}x{r['seq']}",
                    r["rounds_per_s"],
                    r["client_steps_per_s"],
                    f"{100 * r['mfu']:.1f}%",
                    r.get("speedup_vs_jax_loop", ""),
                    r.get("speedup_vs_torch_loop", ""),
                    "" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}",
                ]
            )
    m = result["machine"]
    write_markdown(
        NAME,
        "FedPEAT round throughput: vectorized clients vs per-client loops",
        [
            "model",
            "dtype",
            "clients",
            "local batch",
            "rounds/s",
            "client-steps/s",
            "MFU",
            "x jax loop",
            "x torch+peft loop",
            "peak MiB",
        ],
        table,
        notes=[
            f"Machine: {hardware(m)}, jax {m['jax']}, torch {m['torch']} (on {device}); load average at start {m['loadavg_1_5_15']}.",
            f"Matmul peak in this run ({peaks['float32']['n']}^3, JAX): float32 {peaks['float32']['flops_per_s'] / 1e9:.1f} GFLOP/s, bfloat16 {peaks['bfloat16']['flops_per_s'] / 1e9:.1f} GFLOP/s.",
            f"Each client: {LOCAL_STEPS} local Adam steps of LoRA r={RANK} on the adapter blocks of a 2-2-2 emulator; FLOPs and MFU as in the script's docstring.",
            f"Speedups: the per-client loop's round time / the vectorized round time, same clients, data and steps, measured in this run (torch baseline in float32, on {device}).",
            "peak MiB: XLA's compiled memory analysis (arguments + outputs + temporaries) of the round.",
        ],
    )


if __name__ == "__main__":
    main()
