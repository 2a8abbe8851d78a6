"""Rounds against Flower, the framework users would pick instead: the same FedPEAT round in
fedpeat_jax (clients vectorized in one jitted call) and in Flower's simulation engine (Ray actors,
each holding one transformers GPT2LMHeadModel + HF peft LoRA, the clients run one after another
on every actor).

    python -m benchmarks.fl_peers               # 16, 64, 256 clients per round, 3 interleaved repetitions (~1 h on 2 cores)
    python -m benchmarks.fl_peers --quick       # smoke run: 16 clients, 1 repetition, 3 rounds
    python -m benchmarks.fl_peers --check-only  # the equivalence check alone (fedpeat_jax and Flower, 16 clients)

Needs the `peers` extra (`pip install -e .[peers]`: flwr[simulation], torch, peft).

Identical work on both sides, in one process, on the same data:
  model   the default foundation model's 2-2-2 emulator (6 blocks of 256 wide, vocabulary 8192;
          the cached pretrained weights when there are, else random weights of that shape);
  client  LoRA r=8 (alpha 16) on the four dense layers of the 4 adapter blocks, a fresh Adam
          (lr 1e-3), 4 local steps of 2 x 64 tokens: one pass over its 8 windows in random order;
  round   every one of m clients trains, then FedAvg (weights = examples; all equal here).
Both start from the same global LoRA (fedpeat_jax's initial state, copied into Flower's initial
parameters). Each client's windows are drawn from a 64-token subset of the vocabulary (Zipf), so
the loss falls fast and the check below means something.

Equivalence check: the mean training loss of the clients in rounds 1-3 must agree between the two
sides within LOSS_RTOL (0.5%, while the loss falls by about 10%); they differ only by the order in
which a client reads its windows (each side draws its own permutation) and float rounding.

Timing: one run = ROUNDS rounds (Flower: one `run_simulation` call); round 1 is excluded (Ray
actors import torch and build their model on their first client; fedpeat_jax is compiled before,
untimed). Repetitions are interleaved (fedpeat_jax, Flower 1 CPU per client, Flower 2 CPUs per
client, at each client count, then again) so slow drifts of the machine hit all alike. Flower
runs as many actors as the machine's cores allow (2 cores: two single-thread actors, or one actor
with two threads). Reported: median seconds per round, rounds/s, seconds per client, and
fedpeat_jax's speedup over Flower's best configuration at each client count; MFU of the
fedpeat_jax round against the float32 matmul peak measured in this run (FLOPs as in
benchmarks/fl_throughput.py).
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

from benchmarks.common import RESULTS_DIR, machine_info, matmul_peak, torch_lora_emulator, write_json, write_markdown
from benchmarks.fl_throughput import flops_per_client_step, foundation_params
from fedpeat_jax.config import FedConfig, PeftConfig
from fedpeat_jax.peat.emulator import EmulatorSpec

NAME = "fl_peers"
RANK, LOCAL_STEPS, BATCH, SEQ, LR = 8, 4, 2, 64, 1e-3
EXAMPLES = LOCAL_STEPS * BATCH  # every client holds one pass of local batches
ROUNDS = 4  # per timed run; round 1 excluded
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
def fedpeat_round(params, cfg, tokens: np.ndarray):
    """(round_fn, state): `round_fn(state) -> (state, mean client loss)`, compiled, on `tokens`'
    clients, all of them training in every round."""
    from fedpeat_jax.fed.client import Hyper
    from fedpeat_jax.fed.simulation import FedData, FedPEAT

    m = tokens.shape[0]
    fed = FedConfig(clients_per_round=m, local_steps=LOCAL_STEPS, local_batch=BATCH, client_lr=LR,
                    emulator_levels=(2,), log_lora_gap=False)
    sim = FedPEAT(params, cfg, PeftConfig(kind="lora", lora_rank=RANK, lora_alpha=2.0 * RANK), fed, n_clients=m)
    data = FedData.from_arrays(tokens, np.ones(tokens.shape, np.float32), np.full(m, EXAMPLES))
    hyper = Hyper.from_config(fed)
    state = sim.init(jax.random.key(0))
    compiled = jax.jit(lambda s, d, h: sim.round(s, d, h)).lower(state, data, hyper).compile()

    def round_fn(s):
        s, metrics = compiled(s, data, hyper)
        return s, float(metrics.loss)  # float() waits for the round

    return round_fn, state


def initial_lora(state, spec: EmulatorSpec) -> dict:
    """The global LoRA of a fedpeat_jax server `state` as HF peft state-dict arrays of the
    emulator model (peft's lora_A.weight is our a.T, lora_B.weight our b.T)."""
    lora = state.peft["blocks"]["lora"]
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
        ids = tokens[order[s * BATCH:(s + 1) * BATCH]]
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
            arrays, loss = torch_fit(model, tokens[self.cid], names, parameters, seed=1000 * int(config["round"]) + self.cid)
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

    strategy = TimedFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=m, min_available_clients=m,
                           min_evaluate_clients=0, initial_parameters=initial, on_fit_config_fn=lambda r: {"round": r},
                           fit_metrics_aggregation_fn=mean_loss)

    def server_fn(context):
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=n_rounds))

    threads = cpus_per_client
    client_app = flwr.client.ClientApp(client_fn=_client_fn(str(workdir), threads))
    backend = {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
               "init_args": {"num_cpus": len(os.sched_getaffinity(0)), "logging_level": logging.ERROR, "log_to_driver": False}}
    flwr.simulation.run_simulation(flwr.server.ServerApp(server_fn=server_fn), client_app, num_supernodes=m,
                                   backend_config=backend)
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
IMPLS = {"fedpeat_jax": None, "flower_1cpu": 1, "flower_2cpu": 2}  # name -> Flower CPUs per client


def loss_agreement(losses: dict) -> dict:
    """Rounds 1..LOSS_ROUNDS of every Flower configuration against fedpeat_jax's."""
    ref = np.asarray(losses["fedpeat_jax"][:LOSS_ROUNDS])
    out = {"rounds": LOSS_ROUNDS, "rtol": LOSS_RTOL, "losses": losses}
    worst = 0.0
    for name, values in losses.items():
        if name != "fedpeat_jax":
            worst = max(worst, float(np.max(np.abs(np.asarray(values[:LOSS_ROUNDS]) - ref) / ref)))
    out["max_rel_diff"] = worst
    out["loss_drop"] = float(ref[0] - ref[-1])  # the loss moves by much more than the disagreement
    out["ok"] = bool(worst <= LOSS_RTOL)
    return out


def summarize(m: int, runs: dict, peak: float, step_flops: float) -> dict:
    """Medians over every timed round (round 1 of each run excluded) of every repetition."""
    row = {"clients": m}
    for name, reps in runs.items():
        timed = [t for rep in reps for t in rep["round_s"][1:]]
        row[name] = {"round_s": statistics.median(timed), "rounds": timed}
    best = min((n for n in runs if n != "fedpeat_jax"), key=lambda n: row[n]["round_s"])
    ours = row["fedpeat_jax"]["round_s"]
    row.update(flower_best=best, speedup_vs_flower_best=row[best]["round_s"] / ours,
               mfu=step_flops * m * LOCAL_STEPS / ours / peak)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="16,64,256", help="clients per round, comma-separated")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"rounds per run (>= {LOSS_ROUNDS}; round 1 untimed)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 clients, 1 repetition; writes fl_peers_quick.*")
    parser.add_argument("--check-only", action="store_true", help="only the loss agreement at 16 clients (1 run each)")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    if args.quick or args.check_only:
        counts, args.reps, args.rounds = [16], 1, LOSS_ROUNDS
    if args.rounds < LOSS_ROUNDS or args.reps < 1 or min(counts) < 1:
        parser.error(f"--rounds must be >= {LOSS_ROUNDS}, --reps >= 1, clients >= 1")
    try:
        import flwr  # noqa: F401
    except ImportError:
        parser.exit(2, "fl_peers needs Flower: pip install -e .[peers]\n")
    name = NAME + ("_quick" if args.quick else "")

    params, cfg, weights = foundation_params("default")
    peak = matmul_peak("float32")
    step_flops = flops_per_client_step(cfg, emulator_spec(cfg).depth, BATCH, SEQ)
    start_info = machine_info()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fl_peers_") as tmp:
        setups = {}
        for m in counts:
            workdir = Path(tmp) / f"m{m}"
            workdir.mkdir()
            tokens = client_tokens(m, cfg.vocab_size)
            t0 = time.perf_counter()
            round_fn, state = fedpeat_round(params, cfg, tokens)
            print(f"fedpeat_jax round for {m} clients compiled in {time.perf_counter() - t0:.1f} s", flush=True)
            write_workload(workdir, params, cfg, tokens, initial_lora(state, emulator_spec(cfg)))
            setups[m] = (workdir, round_fn, state)
        runs = {m: {impl: [] for impl in IMPLS} for m in counts}
        for rep in range(args.reps):
            for m in counts:
                workdir, round_fn, state = setups[m]
                for impl, cpus in IMPLS.items():
                    out = run_fedpeat(round_fn, state, args.rounds) if cpus is None else run_flower(workdir, m, cpus, args.rounds)
                    runs[m][impl].append(out)
                    print(f"rep {rep + 1}/{args.reps}  {m:4d} clients  {impl:12s} round s {np.round(out['round_s'], 2).tolist()}"
                          f"  loss {np.round(out['loss'], 4).tolist()}", flush=True)
    rows = [summarize(m, runs[m], peak["flops_per_s"], step_flops) for m in counts]
    checks = {m: loss_agreement({impl: runs[m][impl][0]["loss"] for impl in IMPLS}) for m in counts}
    result = {"machine": start_info, "machine_at_end": machine_info(), "matmul_peak": peak, "weights": weights,
              "model": cfg.__dict__, "emulator": emulator_spec(cfg).name, "lora_rank": RANK, "local_steps": LOCAL_STEPS,
              "batch": BATCH, "seq": SEQ, "lr": LR, "rounds_per_run": args.rounds, "reps": args.reps, "quick": args.quick,
              "flops_per_client_step": step_flops, "rows": rows, "loss_check": {str(m): c for m, c in checks.items()}}
    write_json(name, result)
    write_report(name, result)
    failed = [m for m, c in checks.items() if not c["ok"]]
    if failed:
        print(f"LOSS CHECK FAILED at {failed} clients: the two sides disagree by more than {LOSS_RTOL:.1%}")
        return 1
    return 0


def write_report(name: str, result: dict) -> None:
    rows, m0 = result["rows"], result["machine"]
    label = {"fedpeat_jax": "fedpeat_jax", "flower_1cpu": "Flower, 1 CPU per client", "flower_2cpu": "Flower, 2 CPUs per client"}
    table = []
    for r in rows:
        m = r["clients"]
        table.append([m] + [f"{r[i]['round_s']:.2f} s ({1 / r[i]['round_s']:.3g}/s)" for i in IMPLS]
                     + [f"{r['fedpeat_jax']['round_s'] / m:.3f} / {r[r['flower_best']]['round_s'] / m:.3f}",
                        f"{r['speedup_vs_flower_best']:.2f}x", f"{100 * r['mfu']:.1f}%"])
    checks = []
    for m, c in result["loss_check"].items():
        for k in range(c["rounds"]):
            checks.append([m, k + 1] + [f"{c['losses'][i][k]:.4f}" for i in IMPLS])
        checks.append([m, "max rel. diff", f"{100 * c['max_rel_diff']:.2f}%", "ok" if c["ok"] else "FAILED", ""])
    quick = " (QUICK SMOKE RUN: 16 clients, 1 repetition; not the benchmark's figures)" if result["quick"] else ""
    notes = [
        f"Machine: {m0['cpu_model']}, {m0['cpus_usable']} usable cores, jax {m0['jax']}, torch {m0['torch']}; "
        f"load average at start {m0['loadavg_1_5_15']}, at end {result['machine_at_end']['loadavg_1_5_15']}.",
        f"Work per client: {result['local_steps']} Adam steps (lr {result['lr']}) of LoRA r={result['lora_rank']} on the "
        f"adapter blocks of the {result['emulator']} emulator of the default model ({result['weights']}), "
        f"batches of {result['batch']} x {result['seq']} tokens; FedAvg. Every client trains in every round.",
        f"Round times: medians over rounds 2-{result['rounds_per_run']} of {result['reps']} interleaved repetition(s). "
        "s per client: round time / clients (fedpeat_jax / Flower's best configuration).",
        f"MFU: fedpeat_jax's round FLOPs / its round time / the float32 matmul peak measured in this run "
        f"({result['matmul_peak']['flops_per_s'] / 1e9:.1f} GFLOP/s).",
        f"Same work: the clients' mean training loss in rounds 1-{LOSS_ROUNDS} agrees within {LOSS_RTOL:.1%} "
        "(the sides differ only in each client's window order and float rounding); table below.",
    ]
    write_markdown(name, "FedPEAT rounds: fedpeat_jax against Flower's simulation engine" + quick,
                   ["clients", *(label[i] + " s/round" for i in IMPLS), "s per client (ours / Flower best)",
                    "x Flower best", "fedpeat_jax MFU"], table, notes=notes)
    with open(RESULTS_DIR / f"{name}.md", "a") as f:
        from benchmarks.common import markdown_table

        f.write("\n## Same work: mean client training loss per round\n\n")
        f.write(markdown_table(["clients", "round", *(label[i] for i in IMPLS)], checks) + "\n")
    plot(name, result)


def plot(name: str, result: dict) -> None:
    from fedpeat_jax.io.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    counts = [r["clients"] for r in result["rows"]]
    for impl, style in (("fedpeat_jax", "o-"), ("flower_1cpu", "s--"), ("flower_2cpu", "^--")):
        ax.plot(counts, [r[impl]["round_s"] / r["clients"] for r in result["rows"]], style, label=impl.replace("_", " "))
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.set_xlabel("clients per round")
    ax.set_ylabel("seconds per client")
    ax.set_ylim(bottom=0)
    ax.set_title(f"One FedPEAT round, {result['machine']['cpus_usable']} CPU cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / f"{name}.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    # Ray actors import the client code as benchmarks.fl_peers; run it under that name, not __main__.
    from benchmarks import fl_peers

    sys.exit(fl_peers.main())
