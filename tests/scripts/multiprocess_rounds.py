"""Three FedPEAT rounds over a mesh of devices, in one process or as one of several processes.

    python multiprocess_rounds.py --devices 4 --out single.npz
    python multiprocess_rounds.py --devices 2 --processes 2 --process-id I --port P --out multi.npz

Each process builds the same tiny model and the same global client data, but puts only its own
clients on its devices (`fed.data.from_process_local`); process 0 writes the final trainable tree.
"""

import argparse

import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--devices", type=int, required=True, help="CPU devices of this process")
parser.add_argument("--processes", type=int, default=1)
parser.add_argument("--process-id", type=int, default=0)
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--out", required=True)
parser.add_argument("--ckpt", default=None, help="checkpoint directory (resume from it when it holds checkpoints)")
parser.add_argument("--stop-after-chunks", type=int, default=None, help="stop early, as if killed")
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
from fedpeat_jax.fed import driver  # noqa: E402
from fedpeat_jax.fed.data import FedData, from_process_local, process_slice  # noqa: E402
from fedpeat_jax.fed.simulation import FedPEAT  # noqa: E402
from fedpeat_jax.model import gpt2  # noqa: E402

model = GPT2Config(
    vocab_size=61, n_positions=16, n_embd=16, n_layer=5, n_head=2, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0
)
n_clients = 16
rs = np.random.RandomState(0)
everything = FedData(
    rs.randint(0, 61, (n_clients, 4, 8)).astype(np.int32),
    np.ones((n_clients, 4, 8), np.float32),
    rs.randint(1, 5, n_clients).astype(np.int32),
    np.zeros(n_clients, np.int32),
)
mesh = sharding.client_mesh()
assert mesh.size == 4, mesh
mine = process_slice(n_clients)
data = from_process_local(FedData(*(x[mine] for x in everything)), n_clients, mesh)
params = sharding.replicate(gpt2.init(jax.random.key(0), model), mesh)
cfg = FedConfig(
    clients_per_round=10,
    local_steps=2,
    client_chunk=4,
    emulator_levels=(1,),
    rounds=3,
    rounds_per_chunk=1,
    log_lora_gap=True,
)
sim = FedPEAT(model, PeftConfig(kind="lora", lora_rank=2), cfg, n_clients=n_clients, mesh=mesh)
result = driver.train(
    sim, params, data, seed=1, show_progress=False, ckpt_dir=args.ckpt, stop_after_chunks=args.stop_after_chunks
)
tree = driver._host(result.state.trainable)
if jax.process_index() == 0:
    leaves = {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)}
    np.savez(args.out, **leaves, loss=np.asarray([row["loss"] for row in result.history]))
print("DONE", jax.process_index(), jax.process_count(), len(jax.devices()), flush=True)
