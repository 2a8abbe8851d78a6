"""Rounds against Flower, the framework users would pick instead: the same FedPEAT round in
fedpeat_jax (clients vectorized in one jitted call) and in Flower's simulation engine (Ray actors,
each holding one transformers GPT2LMHeadModel + HF peft LoRA, running its clients one after another).

    python -m benchmarks.fl_peers                 # 64 and 256 clients per round, 2 interleaved repetitions (~30 min on 2 cores)
    python -m benchmarks.fl_peers --clients 16,64,256 --reps 3 --only all   # every variant (~1.5 h on 2 cores)
    python -m benchmarks.fl_peers --quick         # smoke run: 16 clients, 1 repetition, 3 rounds -> fl_peers_quick.*
    python -m benchmarks.fl_peers --only flower_1cpu --clients 16,64

Needs the `peers` extra (`pip install -e .[peers]`: flwr[simulation], torch, peft).

Identical work everywhere, in one process, on the same data:
  model   the default foundation model's 2-2-2 emulator (6 blocks of 256 wide, vocabulary 8192;
          the cached pretrained weights when there are, else random weights of that shape);
  client  LoRA r=8 (alpha 16) on the four dense layers of the 4 adapter blocks, a fresh Adam
          (lr 1e-3), 4 local steps of 2 x 64 tokens: one pass over its 8 windows in random order;
  round   every one of m clients trains, then FedAvg (weights = examples; all equal here).
All start from the same global LoRA (fedpeat_jax's initial state, copied into Flower's initial
parameters). Each client's windows are drawn from a 64-token subset of the vocabulary (Zipf), so
the loss falls fast and the check below means something.

Implementations (`implementations`): fedpeat_jax in float32 and in bfloat16 compute (bfloat16
matmul operands, float32 accumulation: `gpt2.matmul`), each on one CPU device (XLA spreads every
operation over the cores) and with the clients split over one CPU device per core (`FedPEAT`'s
client mesh); Flower with 1 and with 2 CPUs per client (2 cores: two single-thread actors, or one
actor with two threads). A default run times fedpeat_jax with the clients split over the cores in
both dtypes and both Flower configurations (`select`); `--only all` adds fedpeat_jax on one device.

Equivalence check: every implementation's mean client training loss in rounds 1-3 agrees with
fedpeat_jax's float32 round (`reference`) within LOSS_RTOL (0.5%, while the loss falls by about 10%); they
differ only in the order in which a client reads its windows (each side draws its own
permutation), float rounding and, for bfloat16, rounded matmul operands.

Timing: one run = ROUNDS rounds (Flower: one `run_simulation` call); round 1 is excluded (Ray
actors import torch and build their model on their first client; fedpeat_jax is compiled before,
untimed). Repetitions are interleaved (every implementation at each client count, then again) so
slow drifts of the machine hit all alike. Reported: median seconds per round, rounds/s, seconds
per client, each fedpeat_jax variant's speedup over Flower's best configuration at the same
clients per round, and its MFU against the matmul peak of its dtype measured in this run (FLOPs as
in benchmarks/fl_throughput.py).

The fedpeat_jax side is `fedpeat_round` (and `initial_lora`, which reads its server state): the
one place to port when the engine's API changes.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runnable as a plain script

import jax
import numpy as np

from benchmarks.common import (
    LOADED,
    RESULTS_DIR,
    best_peaks,
    machine_info,
    matmul_peak,
    torch_lora_emulator,
    under_load,
    write_json,
    write_markdown,
)
from benchmarks.fl_throughput import flops_per_client_step, foundation_params
from fedpeat_jax.config import FedConfig, PeftConfig
from fedpeat_jax.peat.emulator import EmulatorSpec

NAME = "fl_peers"
RANK, LOCAL_STEPS, BATCH, SEQ, LR = 8, 4, 2, 64, 1e-3
EXAMPLES = LOCAL_STEPS * BATCH  # every client holds one pass of local batches
ROUNDS = 3  # per timed run; round 1 excluded
LOSS_ROUNDS, LOSS_RTOL = 3, 0.005
SUBSET = 64  # tokens the client data is drawn from


# --------------------------------------------------------------------------------------------
# The shared workload
# --------------------------------------------------------------------------------------------
def client_tokens(m: int, vocab: int, seed: int = 0) -> np.ndarray:
    """(m, EXAMPLES, SEQ) windows: Zipf-distributed tokens from a fixed 64-token subset."""
    rs = np.random.RandomState(seed)
    subset = rs.choice(vocab, SUBSET, replace=False)
    p = 1.0 / np.arange(1, SUBSET + 1)
    return subset[rs.choice(SUBSET, (m, EXAMPLES, SEQ), p=p / p.sum())].astype(np.int32)


def emulator_spec(cfg) -> EmulatorSpec:
    return EmulatorSpec(cfg.n_layer, 2, 2, 2)


# --------------------------------------------------------------------------------------------
# fedpeat_jax: the whole round is one jitted call (the one place to port to a new engine API)
# --------------------------------------------------------------------------------------------
def fedpeat_round(params, cfg, tokens: np.ndarray, devices: int = 1):
    """(round_fn, state): `round_fn(state) -> (state, mean client loss)`, compiled, on `tokens`'
    clients, all of them training in every round, split over the first `devices` devices."""
    from fedpeat_jax.fed.client import Hyper
    from fedpeat_jax.fed.sharding import client_mesh, replicate, shard_clients
    from fedpeat_jax.fed.simulation import FedData, FedPEAT

    m = tokens.shape[0]
    mesh = client_mesh(jax.devices()[:devices]) if devices > 1 else None
    fed = FedConfig(
        clients_per_round=m,
        local_steps=LOCAL_STEPS,
        local_batch=BATCH,
        client_lr=LR,
        emulator_levels=(2,),
        log_lora_gap=False,
    )
    sim = FedPEAT(cfg, PeftConfig(kind="lora", lora_rank=RANK, lora_alpha=2.0 * RANK), fed, n_clients=m, mesh=mesh)
    data = FedData.from_arrays(tokens, np.ones(tokens.shape, np.float32), np.full(m, EXAMPLES))
    if mesh is not None:
        data, params = shard_clients(data, mesh), replicate(params, mesh)
    hyper = Hyper.from_config(fed)
    state = jax.jit(sim.init)(jax.random.key(0), params, hyper)
    compiled = jax.jit(sim.round).lower(state, params, data, hyper).compile()

    def round_fn(s):
        s, metrics = compiled(s, params, data, hyper)
        return s, float(metrics.loss)  # float() waits for the round

    return round_fn, state


def initial_lora(state, spec: EmulatorSpec) -> dict:
    """The global LoRA of a fedpeat_jax server `state` as HF peft state-dict arrays of the
    emulator model (peft's lora_A.weight is our a.T, lora_B.weight our b.T)."""
    lora = state.trainable["blocks"]["lora"]
    out = {}
    for row, layer in enumerate(spec.emulator_adapter_ids):
        for group, names in lora.items():
            for name, ab in names.items():
                prefix = f"base_model.model.transformer.h.{layer}.{group}.{name}"
                out[f"{prefix}.lora_A.weight"] = np.asarray(ab["a"][row]).T.copy()
                out[f"{prefix}.lora_B.weight"] = np.asarray(ab["b"][row]).T.copy()
    return out


def run_fedpeat(round_fn, state, n_rounds: int) -> dict:
    times, losses = [], []
    for _ in range(n_rounds):
        start = time.perf_counter()
        state, loss = round_fn(state)
        times.append(time.perf_counter() - start)
        losses.append(loss)
    return {"round_s": times, "loss": losses}


# --------------------------------------------------------------------------------------------
# Flower: a NumPyClient per client, one torch model per Ray actor
# --------------------------------------------------------------------------------------------
_ACTOR = {}  # per actor process: the workload directory -> (peft model, tokens, parameter names)


def load_workload(workdir) -> dict:
    with open(Path(workdir) / "workload.pkl", "rb") as f:
        return pickle.load(f)


def _actor_model(workdir: str, threads: int):
    """This actor's model and data, built on its first client. Module-level, so it lives in the
    actor process (the client code is pickled by reference: run this file as a module)."""
    if workdir not in _ACTOR:
        import torch

        w = load_workload(workdir)
        model = torch_lora_emulator(w["params"], w["cfg"], emulator_spec(w["cfg"]), RANK, threads=threads)
        _ACTOR[workdir] = (model, torch.as_tensor(w["tokens"], dtype=torch.long), sorted(w["lora"]))
    return _ACTOR[workdir]


def torch_fit(model, tokens, names, arrays, seed: int):
    """One client's local training in torch: load the global LoRA `arrays` (peft state-dict order
    `names`), a fresh Adam, LOCAL_STEPS steps over its windows `tokens` (EXAMPLES, SEQ) in a
    random order drawn from `seed`. Returns (the client's LoRA arrays, its mean step loss)."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    set_peft_model_state_dict(model, {k: torch.as_tensor(v) for k, v in zip(names, arrays)})
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    order = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(seed))
    losses = []
    for s in range(LOCAL_STEPS):
        ids = tokens[order[s * BATCH : (s + 1) * BATCH]]
        opt.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    state = get_peft_model_state_dict(model)
    return [state[k].detach().numpy().copy() for k in names], float(np.mean(losses))


def _client_fn(workdir: str, threads: int):
    import flwr

    class LoraClient(flwr.client.NumPyClient):
        def __init__(self, cid: int):
            self.cid = cid

        def fit(self, parameters, config):
            model, tokens, names = _actor_model(workdir, threads)
            arrays, loss = torch_fit(
                model, tokens[self.cid], names, parameters, seed=1000 * int(config["round"]) + self.cid
            )
            return arrays, EXAMPLES, {"loss": loss}

    def client_fn(context):
        from flwr.common.constant import PARTITION_ID_KEY

        return LoraClient(int(context.node_config[PARTITION_ID_KEY])).to_client()

    return client_fn


def run_flower(workdir: Path, m: int, cpus_per_client: int, n_rounds: int) -> dict:
    """One `run_simulation` of `n_rounds` rounds over `m` clients; per-round wall times measured
    from the strategy's configure_fit to the end of its aggregate_fit."""
    import flwr
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg

    logging.getLogger("flwr").setLevel(logging.ERROR)  # run_simulation's deprecation notice, each run
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")  # Ray forks then execs: harmless
    lora = load_workload(workdir)["lora"]
    initial = ndarrays_to_parameters([lora[k] for k in sorted(lora)])
    times, losses, starts = [], [], {}

    class TimedFedAvg(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            starts[server_round] = time.perf_counter()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            if failures:
                raise RuntimeError(f"Flower round {server_round}: {len(failures)} client(s) failed: {failures[0]!r}")
            parameters, metrics = super().aggregate_fit(server_round, results, failures)
            times.append(time.perf_counter() - starts[server_round])
            losses.append(metrics["loss"])
            return parameters, metrics

    def mean_loss(results):  # weighted by examples, as FedAvg weighs the updates
        return {"loss": sum(n * m["loss"] for n, m in results) / sum(n for n, _ in results)}

    strategy = TimedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=m,
        min_available_clients=m,
        min_evaluate_clients=0,
        initial_parameters=initial,
        on_fit_config_fn=lambda r: {"round": r},
        fit_metrics_aggregation_fn=mean_loss,
    )

    def server_fn(context):
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=n_rounds))

    threads = cpus_per_client
    client_app = flwr.client.ClientApp(client_fn=_client_fn(str(workdir), threads))
    backend = {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
        "init_args": {"num_cpus": len(os.sched_getaffinity(0)), "logging_level": logging.ERROR, "log_to_driver": False},
    }
    flwr.simulation.run_simulation(
        flwr.server.ServerApp(server_fn=server_fn), client_app, num_supernodes=m, backend_config=backend
    )
    if len(times) != n_rounds:
        raise RuntimeError(f"Flower finished {len(times)} of {n_rounds} rounds (see its log above)")
    return {"round_s": times, "loss": losses}


def write_workload(workdir: Path, params, cfg, tokens: np.ndarray, lora: dict) -> None:
    """What the actors load: the full model's weights, its config, the data, the initial LoRA."""
    w = {"params": jax.tree.map(np.asarray, params), "cfg": cfg, "tokens": tokens, "lora": lora}
    with open(workdir / "workload.pkl", "wb") as f:
        pickle.dump(w, f)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def implementations(cores: int) -> dict:
    """name -> ("fedpeat", compute dtype, devices the clients are split over) or ("flower", CPUs per client)."""
    out = {"fedpeat_jax": ("fedpeat", "float32", 1)}
    if cores > 1:
        out["fedpeat_jax_sharded"] = ("fedpeat", "float32", cores)
    out["fedpeat_jax_bf16"] = ("fedpeat", "bfloat16", 1)
    if cores > 1:
        out["fedpeat_jax_bf16_sharded"] = ("fedpeat", "bfloat16", cores)
    out["flower_1cpu"] = ("flower", 1)
    if cores > 1:
        out["flower_2cpu"] = ("flower", 2)
    return out


def reference(impls: dict) -> str:
    """The loss reference among `impls`: fedpeat_jax's float32 round."""
    return next(name for name, spec in impls.items() if spec[:2] == ("fedpeat", "float32"))


def select(impls: dict, only: str, cores: int) -> dict:
    """The implementations a run times: the names in `only` (comma-separated; "all": every one;
    empty: the default, fedpeat_jax with the clients split over all `cores` in both dtypes and
    every Flower configuration), always with a float32 fedpeat_jax round, the loss reference.
    Raises ValueError on an unknown name."""
    if only == "all":
        names = set(impls)
    elif only:
        names = set(only.split(","))
        if names - set(impls):
            raise ValueError(
                f"--only: unknown implementation(s) {sorted(names - set(impls))}; choose from {sorted(impls)} or 'all'"
            )
    else:
        names = {k for k, spec in impls.items() if spec[0] == "flower" or spec[2] == cores}
    chosen = {k: v for k, v in impls.items() if k in names}
    if not any(spec[:2] == ("fedpeat", "float32") for spec in chosen.values()):
        chosen = {"fedpeat_jax": impls["fedpeat_jax"], **chosen}
    return chosen


LABELS = {
    "fedpeat_jax": "fedpeat_jax, float32",
    "fedpeat_jax_sharded": "fedpeat_jax, float32, clients split over the cores",
    "fedpeat_jax_bf16": "fedpeat_jax, bfloat16",
    "fedpeat_jax_bf16_sharded": "fedpeat_jax, bfloat16, clients split over the cores",
    "flower_1cpu": "Flower, 1 CPU per client",
    "flower_2cpu": "Flower, 2 CPUs per client",
}


def loss_agreement(losses: dict, ref_name: str) -> dict:
    """Rounds 1..LOSS_ROUNDS of every implementation against fedpeat_jax's float32 round `ref_name`."""
    ref = np.asarray(losses[ref_name][:LOSS_ROUNDS])
    rel = {name: float(np.max(np.abs(np.asarray(v[:LOSS_ROUNDS]) - ref) / ref)) for name, v in losses.items()}
    worst = max(rel.values())
    return {
        "rounds": LOSS_ROUNDS,
        "rtol": LOSS_RTOL,
        "reference": ref_name,
        "losses": losses,
        "rel_diff": rel,
        "max_rel_diff": worst,
        "loss_drop": float(ref[0] - ref[-1]),
        "ok": bool(worst <= LOSS_RTOL),
    }


def summarize(m: int, runs: dict, impls: dict, peaks: dict, step_flops: float) -> list:
    """One row per implementation: medians over every timed round (round 1 of each run excluded)
    of every repetition, and fedpeat_jax's speedup over Flower's best configuration."""
    times = {name: statistics.median([t for rep in reps for t in rep["round_s"][1:]]) for name, reps in runs.items()}
    best = min((n for n in runs if impls[n][0] == "flower"), key=times.get)
    rows = []
    for name, t in times.items():
        row = {
            "clients": m,
            "impl": name,
            "round_s": t,
            "rounds_per_s": 1.0 / t,
            "s_per_client": t / m,
            "rounds": [x for rep in runs[name] for x in rep["round_s"]],
            "flower_best": best,
        }
        if impls[name][0] == "fedpeat":
            dtype = impls[name][1]
            row.update(
                dtype=dtype,
                devices=impls[name][2],
                speedup_vs_flower_best=times[best] / t,
                mfu=step_flops * m * LOCAL_STEPS / t / peaks[dtype]["flops_per_s"],
            )
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="64,256", help="clients per round, comma-separated")
    parser.add_argument("--reps", type=int, default=2, help="interleaved repetitions")
    parser.add_argument(
        "--rounds", type=int, default=ROUNDS, help=f"rounds per run (>= {LOSS_ROUNDS}; round 1 untimed)"
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated implementations to run, or 'all' (default: see `select`); "
        "a float32 fedpeat_jax round always runs (the loss reference)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 16 clients, 1 repetition; writes fl_peers_quick.*"
    )
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    jax.config.update("jax_num_cpu_devices", cores)  # one CPU device per core, for the sharded variants
    try:
        impls = select(implementations(cores), args.only, cores)
    except ValueError as e:
        parser.error(str(e))
    ref_name = reference(impls)
    counts = [int(c) for c in args.clients.split(",")]
    if args.quick:
        counts, args.reps, args.rounds = [16], 1, LOSS_ROUNDS
    if args.rounds < LOSS_ROUNDS or args.reps < 1 or min(counts) < 1 or any(m % cores for m in counts):
        parser.error(
            f"--rounds must be >= {LOSS_ROUNDS}, --reps >= 1, clients a positive multiple of the {cores} cores"
        )
    if any(v[0] == "flower" for v in impls.values()):
        try:
            import flwr  # noqa: F401
        except ImportError:
            parser.exit(2, "fl_peers needs Flower: pip install -e .[peers]\n")
    name = NAME + ("_quick" if args.quick else "")

    params, cfg, weights = foundation_params("default")
    peak_runs = [{dtype: matmul_peak(dtype) for dtype in ("float32", "bfloat16")}]  # again at the end: the best of both
    step_flops = flops_per_client_step(cfg, emulator_spec(cfg).depth, BATCH, SEQ)
    start_info = machine_info()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fl_peers_") as tmp:
        setups = {}
        for m in counts:
            tokens = client_tokens(m, cfg.vocab_size)
            for impl, spec in impls.items():
                if spec[0] == "fedpeat":
                    t0 = time.perf_counter()
                    setups[m, impl] = fedpeat_round(params, cfg.replace(dtype=spec[1]), tokens, devices=spec[2])
                    print(f"{impl} round for {m} clients compiled in {time.perf_counter() - t0:.1f} s", flush=True)
            workdir = Path(tmp) / f"m{m}"
            workdir.mkdir()
            write_workload(workdir, params, cfg, tokens, initial_lora(setups[m, ref_name][1], emulator_spec(cfg)))
            setups[m, "flower"] = workdir
        runs = {m: {impl: [] for impl in impls} for m in counts}
        for rep in range(args.reps):
            for m in counts:
                for impl, spec in impls.items():
                    if spec[0] == "fedpeat":
                        out = run_fedpeat(*setups[m, impl], args.rounds)
                    else:
                        out = run_flower(setups[m, "flower"], m, spec[1], args.rounds)
                    runs[m][impl].append(out)
                    print(
                        f"rep {rep + 1}/{args.reps}  {m:4d} clients  {impl:24s} round s {np.round(out['round_s'], 2).tolist()}"
                        f"  loss {np.round(out['loss'], 4).tolist()}",
                        flush=True,
                    )
    peak_runs.append({dtype: matmul_peak(dtype) for dtype in ("float32", "bfloat16")})
    peaks = best_peaks(peak_runs)
    rows = [row for m in counts for row in summarize(m, runs[m], impls, peaks, step_flops)]
    checks = {m: loss_agreement({impl: runs[m][impl][0]["loss"] for impl in impls}, ref_name) for m in counts}
    result = {
        "machine": start_info,
        "machine_at_end": machine_info(),
        "matmul_peak": peaks,
        "weights": weights,
        "model": cfg.__dict__,
        "emulator": emulator_spec(cfg).name,
        "lora_rank": RANK,
        "local_steps": LOCAL_STEPS,
        "batch": BATCH,
        "seq": SEQ,
        "lr": LR,
        "rounds_per_run": args.rounds,
        "reps": args.reps,
        "quick": args.quick,
        "implementations": {k: list(v) for k, v in impls.items()},
        "flops_per_client_step": step_flops,
        "rows": rows,
        "loss_check": {str(m): c for m, c in checks.items()},
    }
    write_json(name, result)
    write_report(name, result)
    failed = [m for m, c in checks.items() if not c["ok"]]
    if failed:
        print(f"LOSS CHECK FAILED at {failed} clients: the implementations disagree by more than {LOSS_RTOL:.1%}")
        return 1
    return 0


def write_report(name: str, result: dict) -> None:
    from benchmarks.common import markdown_table

    m0, impls = result["machine"], list(result["implementations"])
    table = [
        [
            r["clients"],
            LABELS[r["impl"]],
            f"{r['round_s']:.2f}",
            f"{r['rounds_per_s']:.3g}",
            f"{r['s_per_client']:.3f}",
            f"{r['speedup_vs_flower_best']:.2f}x" if "mfu" in r else ("best" if r["impl"] == r["flower_best"] else ""),
            f"{100 * r['mfu']:.1f}% ({r['dtype']})" if "mfu" in r else "",
        ]
        for r in result["rows"]
    ]
    checks = []
    for m, c in result["loss_check"].items():
        for k in range(c["rounds"]):
            checks.append([m, k + 1] + [f"{c['losses'][i][k]:.4f}" for i in impls])
        checks.append([m, "rel. diff"] + [f"{100 * c['rel_diff'][i]:.3f}%" for i in impls])
    quick = " (QUICK SMOKE RUN: 16 clients, 1 repetition; not the benchmark's figures)" if result["quick"] else ""
    if under_load(m0["loadavg_1_5_15"][0], result["machine_at_end"]["loadavg_1_5_15"][0]):
        quick += f" (MEASURED UNDER LOAD above {LOADED}: other jobs shared the cores; not final figures)"
    peaks = result["matmul_peak"]
    notes = [
        f"Machine: {m0['cpu_model']}, {m0['cpus_usable']} usable cores, jax {m0['jax']}, torch {m0['torch']}; "
        f"load average at start {m0['loadavg_1_5_15']}, at end {result['machine_at_end']['loadavg_1_5_15']}.",
        f"Work per client: {result['local_steps']} Adam steps (lr {result['lr']}) of LoRA r={result['lora_rank']} on the "
        f"adapter blocks of the {result['emulator']} emulator of the default model ({result['weights']}), "
        f"batches of {result['batch']} x {result['seq']} tokens; FedAvg. Every client trains in every round.",
        f"Round times: medians over rounds 2-{result['rounds_per_run']} of {result['reps']} interleaved repetition(s); "
        "x Flower best: Flower's best configuration's round time / this one's, at the same clients per round.",
        f"MFU: the round's FLOPs / its time / the matmul peak of its dtype measured in this run (best of start and end): float32 "
        f"{peaks['float32']['flops_per_s'] / 1e9:.1f} GFLOP/s, bfloat16 (float32 accumulation) "
        f"{peaks['bfloat16']['flops_per_s'] / 1e9:.1f} GFLOP/s.",
        f"Same work: every implementation's mean client training loss in rounds 1-{LOSS_ROUNDS} is within "
        f"{LOSS_RTOL:.1%} of fedpeat_jax's float32 round (clients read their windows in different orders; "
        "bfloat16 rounds matmul operands); table below.",
    ]
    write_markdown(
        name,
        "FedPEAT rounds: fedpeat_jax against Flower's simulation engine" + quick,
        ["clients", "implementation", "s/round", "rounds/s", "s per client", "x Flower best", "MFU"],
        table,
        notes=notes,
    )
    with open(RESULTS_DIR / f"{name}.md", "a") as f:
        f.write("\n## Same work: mean client training loss per round\n\n")
        f.write(markdown_table(["clients", "round", *(LABELS[i] for i in impls)], checks) + "\n")
    plot(name, result)


def plot(name: str, result: dict) -> None:
    from fedpeat_jax.io.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    counts = sorted({r["clients"] for r in result["rows"]})
    for impl in result["implementations"]:
        rows = sorted((r for r in result["rows"] if r["impl"] == impl), key=lambda r: r["clients"])
        style = "o-" if impl.startswith("fedpeat") else "s--"
        ax.plot([r["clients"] for r in rows], [r["s_per_client"] for r in rows], style, label=LABELS[impl])
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.set_xlabel("clients per round")
    ax.set_ylabel("seconds per client")
    ax.set_ylim(bottom=0)
    ax.set_title(f"One FedPEAT round, {result['machine']['cpus_usable']} CPU cores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / f"{name}.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    # Ray actors import the client code as benchmarks.fl_peers; run it under that name, not __main__.
    from benchmarks import fl_peers

    sys.exit(fl_peers.main())
