"""A cohort of 6 runs over a "runs" mesh of 4 devices, in one process or as one of two processes,
interrupted after its first chunk of rounds and resumed from the checkpoint.

    python multiprocess_sweep.py --devices 4 --out single.npz --ckpt DIR
    python multiprocess_sweep.py --devices 2 --processes 2 --process-id I --port P --out multi.npz --ckpt DIR

Every process builds the same tiny model, data and runs (a study replicates the weights and data;
the runs are split over the devices of all processes); process 0 writes the final states.
"""

import argparse

import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--devices", type=int, required=True, help="CPU devices of this process")
parser.add_argument("--processes", type=int, default=1)
parser.add_argument("--process-id", type=int, default=0)
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--out", required=True)
parser.add_argument("--ckpt", required=True)
args = parser.parse_args()

import jax  # noqa: E402

from fedpeat_jax.fed import sharding  # noqa: E402

if args.processes > 1:
    sharding.initialize_distributed(
        f"127.0.0.1:{args.port}", args.processes, args.process_id, local_cpu_devices=args.devices
    )
else:
    jax.config.update("jax_num_cpu_devices", args.devices)

from fedpeat_jax.config import FedConfig, GPT2Config, PeftConfig  # noqa: E402
from fedpeat_jax.fed import sweep  # noqa: E402
from fedpeat_jax.fed.client import Hyper  # noqa: E402
from fedpeat_jax.fed.data import FedData  # noqa: E402
from fedpeat_jax.fed.simulation import FedPEAT  # noqa: E402
from fedpeat_jax.model import gpt2  # noqa: E402

model = GPT2Config(
    vocab_size=61, n_positions=16, n_embd=16, n_layer=5, n_head=2, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0
)
rs = np.random.RandomState(0)
data = FedData.from_arrays(rs.randint(0, 61, (8, 4, 8)), np.ones((8, 4, 8)), rs.randint(1, 5, 8))
heldout = rs.randint(0, 61, (5, 8)).astype(np.int32), np.ones((5, 8), np.float32)
cfg = FedConfig(
    clients_per_round=3, local_steps=2, emulator_levels=(1,), rounds=4, rounds_per_chunk=2, log_lora_gap=False
)
sim = FedPEAT(model, PeftConfig(kind="lora", lora_rank=2), cfg, n_clients=8)
mesh = sweep.run_mesh()
assert mesh.size == 4, mesh
cohort = sweep.Cohort(sim, gpt2.init(jax.random.key(0), model), data, eval_data=heldout, mesh=mesh)
seeds = [0, 1, 2, 3, 4, 5]
hypers = Hyper(
    np.array([1e-3, 1e-2, 3e-2, 1e-2, 1e-2, 1e-2], np.float32),
    np.array([1, 1, 1, 0.5, 2, 1e38], np.float32),
    np.full(6, 0.01, np.float32),
    np.zeros(6, np.float32),
)
first = sweep.run_cohort(cohort, seeds, hypers, ckpt_dir=args.ckpt, stop_after_chunks=1)
assert not first.done
result = sweep.run_cohort(cohort, seeds, hypers, ckpt_dir=args.ckpt)
assert result.done and list(result.diverged) == [5], result.diverged
if jax.process_index() == 0:
    leaves = {
        jax.tree_util.keystr(path): np.asarray(x)
        for path, x in jax.tree_util.tree_leaves_with_path(result.states.trainable)
    }
    ppl = np.array([[h.get("plugin_ppl", np.nan) for h in hist] for hist in result.histories[:5]])
    np.savez(args.out, **leaves, ppl=ppl, zero=result.zero_shot)
print("DONE", jax.process_index(), jax.process_count(), len(jax.devices()), flush=True)
