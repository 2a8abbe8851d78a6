"""Federated rounds: every sampled client tunes its trainable tree, in one jitted call.

One round (`FedPEAT.round`):
  1. sample clients deterministically from (seed, round), separately for each emulator level,
     into a fixed number of slots per level (`FedConfig.slots`): shapes stay static and each
     client pays for its own emulator only;
  2. each level's clients train in chunks of `FedConfig.client_chunk`: `client.local_update`
     vmapped over the chunk, with that level's frozen weights shared (`in_axes=None`), and a
     `lax.scan` over the chunks that folds each chunk into the running aggregate (`fed.stream`),
     so memory is flat in clients per round; optionally the server trains on its own data with
     the full model and joins as one more client;
  3. the aggregate (FedAvg / robust / DP / secure sum / exact LoRA / SCAFFOLD), with non-finite
     clients dropped, moves the global tree through the FedOpt server optimizer.

What is trained is `fed.learner`'s choice (`FedConfig.trainable`): FedPEAT's PEFT module on
emulators, a PEFT module or every weight on the full model; `algorithm="local"` keeps each
client's own tree instead of aggregating. Several rounds run inside one jitted `lax.scan`
(`run_rounds`); `fed.driver` runs the host loop. The frozen weights `params`, the data and the
`Hyper` values are arguments of every method, never constants of the compiled program, so
`jax.vmap` over seeds and hyperparameters works and a compile does not embed the model.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from fedpeat_jax import peft as peft_lib
from fedpeat_jax.config import FedConfig, GPT2Config, PeftConfig
from fedpeat_jax.fed import aggregate, drift, server_opt, stream
from fedpeat_jax.fed.client import Hyper, local_update
from fedpeat_jax.fed.data import FedData
from fedpeat_jax.fed.learner import Learner
from fedpeat_jax.fed.sharding import constrain_clients

# Clients vmapped at once when FedConfig.client_chunk is None. On a CPU a client's cost is about
# flat up to chunks of 8 and grows with larger ones as their activations fall out of the caches
# (one core, 64 clients, bfloat16: 118, 122, 132 and 147 ms of CPU time per client in chunks of
# 4, 8, 16 and 32; benchmarks/results/round_chunks.md). Accelerators need wide vmaps to stay busy.
DEFAULT_CLIENT_CHUNK = 8
ACCELERATOR_CLIENT_CHUNK = 32

__all__ = [
    "ACCELERATOR_CLIENT_CHUNK",
    "DEFAULT_CLIENT_CHUNK",
    "FedData",
    "FedPEAT",
    "RoundMetrics",
    "ServerState",
    "chunk_layout",
    "default_client_chunk",
]


def default_client_chunk(platform: str) -> int:
    """The client chunk used when FedConfig.client_chunk is None, on devices of `platform`."""
    return DEFAULT_CLIENT_CHUNK if platform == "cpu" else ACCELERATOR_CLIENT_CHUNK


class ServerState(NamedTuple):
    trainable: Any  # the global trainable tree (a PEFT state, or the model's weights)
    opt_state: Any  # the server optimizer's state
    adapter_delta: Any  # exact-LoRA mode: dense deltas merged into the tuned blocks' kernels so far
    control: Any  # SCAFFOLD's server control variate c (None otherwise)
    clients: Any  # per-client trees over all N clients: SCAFFOLD's c_i, or local-only's own trees
    round: jax.Array  # () int32, rounds done
    key: jax.Array  # the run's base key; round r uses fold_in(key, r)


class RoundMetrics(NamedTuple):
    loss: jax.Array  # mean local training loss of the clients that took part
    participants: jax.Array  # clients whose update entered the aggregate
    examples: jax.Array  # training examples those clients hold (the round's data)
    dropped: jax.Array  # clients dropped for a non-finite update
    update_norm: jax.Array  # norm of the applied change of the global tree
    lora_gap: jax.Array  # relative ||mean(a) mean(b) - mean(a b)|| (0 when not tracked)


def chunk_layout(n_slots: int, chunk: int, n_devices: int = 1) -> tuple:
    """(number of chunks, clients per chunk) for `n_slots` clients at most `chunk` at a time:
    chunks of equal size (at most n_chunks - 1 padded slots), a multiple of `n_devices` so that
    each chunk splits evenly over the devices."""
    n_chunks = math.ceil(n_slots / chunk)
    size = math.ceil(n_slots / n_chunks)
    return n_chunks, math.ceil(size / n_devices) * n_devices


def _tree_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _pad_to(x, n: int):
    """`x` (leading axis m <= n) extended to n rows by repeating its last row."""
    return x[jnp.minimum(jnp.arange(n), x.shape[0] - 1)]


class FedPEAT:
    """Federated tuning of one model shape, PEFT kind and federated configuration.

    >>> sim = FedPEAT(model_cfg, peft_cfg, fed_cfg, n_clients=len(data.counts))
    >>> state = sim.init(jax.random.key(0), params)
    >>> state, metrics = jax.jit(sim.run_rounds, static_argnums=3)(state, params, data, 5)
    """

    def __init__(self, model: GPT2Config, peft: PeftConfig, fed: FedConfig, n_clients: Optional[int] = None, mesh=None):
        # Validate everything before anything is traced or compiled.
        model.validate()
        fed.validate(n_clients=n_clients, model=model)
        if fed.trainable != "model" and peft.kind in ("prompt", "none"):
            raise ValueError(
                f"FedPEAT tunes a PEFT module inside the model's blocks; PeftConfig.kind {peft.kind!r} has none"
            )
        if fed.lora_aggregation == "exact" and peft.kind != "lora":
            raise ValueError("FedConfig.lora_aggregation='exact' needs PeftConfig.kind='lora'")
        if fed.algorithm in ("scaffold", "local") and n_clients is None:
            raise ValueError(
                f"FedConfig.algorithm={fed.algorithm!r} keeps a tree per client: pass n_clients to FedPEAT"
            )
        self.learner = Learner(model, peft, fed)
        self.model, self.peft, self.fed = model, peft, fed
        self.specs = self.learner.specs
        self.peft_full = self.learner.peft_full  # the PEFT config on the full model (plug-in)
        self.n_clients = n_clients
        self.mesh = mesh  # a `sharding.client_mesh()` to split each chunk's clients over devices

    def replace(self, **fed_changes) -> FedPEAT:
        """The same simulation with some FedConfig fields changed."""
        return FedPEAT(self.model, self.peft, self.fed.replace(**fed_changes), self.n_clients, self.mesh)

    @property
    def client_chunk(self) -> int:
        """FedConfig.client_chunk, or the default for the platform the round runs on."""
        platform = jax.default_backend() if self.mesh is None else self.mesh.devices.flat[0].platform
        return self.fed.client_chunk or default_client_chunk(platform)

    @property
    def effective_chunk(self) -> int:
        """Clients trained at once in the largest level's chunks."""
        return min(self.client_chunk, max(self.fed.slots))

    @property
    def n_devices(self) -> int:
        return 1 if self.mesh is None else int(self.mesh.size)

    @property
    def track_gap(self) -> bool:
        p = self.peft_full
        return (
            self.fed.log_lora_gap
            and p is not None
            and p.kind == "lora"
            and not p.lora_freeze_a
            and self.fed.algorithm != "local"
        )

    # ----------------------------------------------------------------------------------------
    # State
    # ----------------------------------------------------------------------------------------
    def init(self, key: jax.Array, params, hyper: Optional[Hyper] = None) -> ServerState:
        hyper = hyper if hyper is not None else Hyper.from_config(self.fed)
        k_tree, k_run = jax.random.split(key)
        tree = self.learner.init(k_tree, params)
        tx = server_opt.server_optimizer(self.fed.server_optimizer, hyper.server_lr)
        delta = control = clients = None
        if self.fed.lora_aggregation == "exact":
            delta = aggregate.map_lora_targets(stream._dense_zeros, tree["blocks"]["lora"])
        if self.fed.algorithm == "scaffold":
            scaffold = drift.scaffold_init(tree, self.n_clients)
            control, clients = scaffold.c, scaffold.c_clients
        if self.fed.algorithm == "local":
            clients = jax.tree.map(lambda x: jnp.broadcast_to(x, (self.n_clients,) + x.shape), tree)
        return ServerState(tree, tx.init(tree), delta, control, clients, jnp.zeros((), jnp.int32), k_run)

    def base_params(self, state: ServerState, params):
        """The frozen full-model weights the clients' trees apply to, with the exact-LoRA deltas
        merged so far added to the tuned blocks' kernels."""
        if state.adapter_delta is None:
            return params
        blocks = peft_lib.lora.add_to_kernels(params["blocks"], state.adapter_delta, self.learner.tuned_blocks)
        return dict(params, blocks=blocks)

    # ----------------------------------------------------------------------------------------
    # Sampling
    # ----------------------------------------------------------------------------------------
    def sample(self, key: jax.Array, levels: jax.Array, available: Optional[jax.Array] = None):
        """Per level j: `slots[j]` distinct clients drawn uniformly among the available clients
        holding level j. Returns [(ids (s_j,), valid (s_j,))]; a slot is invalid when the level
        has fewer clients than slots."""
        out = []
        for j, n_slots in enumerate(self.fed.slots):
            if n_slots == 0:
                out.append((jnp.zeros((0,), jnp.int32), jnp.zeros((0,), bool)))
                continue
            eligible = levels == j
            if available is not None:
                eligible = eligible & available
            scores = jnp.where(eligible, jax.random.uniform(jax.random.fold_in(key, j), levels.shape), 2.0)
            neg, ids = jax.lax.top_k(-scores, n_slots)  # the n_slots smallest scores
            out.append((ids.astype(jnp.int32), -neg < 2.0))
        return out

    @staticmethod
    def round_keys(state: ServerState):
        """(sample, train, server, aggregate) keys of the round `state.round`: every random draw
        of a run derives from (seed, round), which makes resume exact."""
        return jax.random.split(jax.random.fold_in(state.key, state.round), 4)

    @staticmethod
    def client_keys(k_train, level: int, n: int):
        """Keys of the `n` client slots of emulator level `level`."""
        return jax.random.split(jax.random.fold_in(k_train, level), n)

    # ----------------------------------------------------------------------------------------
    # One round
    # ----------------------------------------------------------------------------------------
    def round(
        self,
        state: ServerState,
        params,
        data: FedData,
        hyper: Hyper,
        server_data=None,
        available=None,
        server_available=None,
    ):
        """One federated round (pure; jit it or scan it).

        `available` (C,) bool limits sampling to those clients; `server_available` () bool turns
        the server's own tuning (`FedConfig.server_participation`) off for this round when False.
        """
        fed = self.fed
        k_sample, k_train, k_server, k_agg = self.round_keys(state)
        groups = self.sample(k_sample, data.levels, available)
        base = self.base_params(state, params)

        weights = [data.counts[ids].astype(jnp.float32) * ok for ids, ok in groups]
        if fed.server_participation:
            if server_data is None:
                raise ValueError(
                    "FedConfig.server_participation needs server_data (tokens, mask) for the server's own tuning"
                )
            on = jnp.ones(()) if server_available is None else jnp.asarray(server_available, jnp.float32)
            weights.append(jnp.reshape(server_data[0].shape[0] * on, (1,)).astype(jnp.float32))
        weights = jnp.concatenate(weights)
        cohort = stream.Cohort(jax.random.fold_in(k_agg, 2), weights > 0, jnp.sum(weights))

        totals = stream.init(fed, state.trainable, self.track_gap)
        store, kept, offset = state.clients, [], 0
        for j, (ids, ok) in enumerate(groups):
            n = ids.shape[0]
            if n == 0:
                continue
            keys = self.client_keys(k_train, j, n)
            slots = offset + jnp.arange(n, dtype=jnp.int32)
            totals, store, level_kept = self._train_level(
                j, state, base, store, data, ids, ok, keys, slots, hyper, totals, cohort
            )
            kept.append(level_kept)
            offset += n

        if fed.server_participation:
            s_tokens, s_mask = server_data
            loss = self.learner.loss(None)
            frozen = self.learner.frozen(base, None)
            res = local_update(
                lambda t, tok, msk, key: loss(t, frozen, tok, msk, key),
                state.trainable,
                state.trainable,
                s_tokens,
                s_mask,
                jnp.int32(s_tokens.shape[0]),
                k_server,
                hyper,
                fed=fed,
                batch=fed.server_batch,
            )
            one = lambda x: jnp.asarray(x)[None]  # noqa: E731
            chunk = stream.Chunk(
                jax.tree.map(one, res.tree),
                jax.tree.map(lambda a, b: one(a - b), res.tree, state.trainable),
                weights[-1:],
                one(res.loss),
                jnp.asarray([offset], jnp.int32),
            )
            totals, server_kept = stream.add(totals, chunk, fed, cohort)
            kept.append(server_kept)

        if stream.rule(fed) == "robust":
            kept = (
                jax.tree.map(lambda *xs: jnp.concatenate(xs), *[k[0] for k in kept]),
                jnp.concatenate([k[1] for k in kept]),
            )
        new_state = self._apply(state, params, totals, kept, store, hyper, k_agg, cohort)
        n_used = totals.used
        metrics = RoundMetrics(
            loss=jnp.where(n_used > 0, totals.loss / jnp.maximum(n_used, 1), jnp.nan),
            participants=n_used,
            examples=totals.weight,
            dropped=totals.dropped,
            update_norm=_tree_norm(jax.tree.map(lambda a, b: a - b, new_state.trainable, state.trainable)),
            lora_gap=stream.gap(totals),
        )
        return new_state, metrics

    def _train_level(self, j, state, base, store, data, ids, ok, keys, slots, hyper, totals, cohort):
        """Level j's clients, a chunk at a time: local training vmapped inside a chunk, a scan over
        chunks folding each into `totals` and writing per-client trees back into `store`."""
        fed, learner = self.fed, self.learner
        n_chunks, size = chunk_layout(ids.shape[0], self.client_chunk, self.n_devices)
        padded = n_chunks * size
        valid = jnp.arange(padded) < ids.shape[0]
        chunked = lambda x: x.reshape((n_chunks, size) + x.shape[1:])  # noqa: E731
        xs = (
            chunked(_pad_to(ids, padded)),
            chunked(_pad_to(ok, padded) & valid),
            chunked(_pad_to(keys, padded)),
            chunked(_pad_to(slots, padded)),
        )
        frozen = learner.frozen(base, j)
        loss = learner.loss(j)
        kind = stream.rule(fed)
        store_size = 0 if store is None else jax.tree.leaves(store)[0].shape[0]

        def train(start, tokens, mask, count, key, control):
            return local_update(
                lambda t, tok, msk, k: loss(t, frozen, tok, msk, k),
                start,
                state.trainable,
                tokens,
                mask,
                count,
                key,
                hyper,
                fed=fed,
                batch=fed.local_batch,
                control=control,
            )

        def body(carry, chunk_xs):
            totals, store = carry
            c_ids, c_ok, c_keys, c_slots = chunk_xs
            per_client = constrain_clients(
                (data.tokens[c_ids], data.mask[c_ids], data.counts[c_ids], c_keys), self.mesh
            )
            start, control, start_axis, control_axes = state.trainable, None, None, None
            if kind == "local":
                start, start_axis = jax.tree.map(lambda x: x[c_ids], store), 0
            if kind == "scaffold":
                control, control_axes = (state.control, jax.tree.map(lambda x: x[c_ids], store)), (None, 0)
            res = jax.vmap(train, in_axes=(start_axis, 0, 0, 0, 0, control_axes))(start, *per_client, control)
            start_b = start if start_axis == 0 else jax.tree.map(lambda x: x[None], start)
            deltas = jax.tree.map(lambda a, b: a - b, res.tree, start_b)
            control_delta = None if control is None else jax.tree.map(lambda a, b: a - b, res.control, control[1])
            chunk = stream.Chunk(
                res.tree, deltas, per_client[2].astype(jnp.float32) * c_ok, res.loss, c_slots, control_delta
            )
            totals, kept = stream.add(totals, chunk, fed, cohort)
            if store is not None:  # local-only trees or SCAFFOLD's c_i of the clients used
                used = stream.used_weights(chunk)[0] > 0
                written = res.tree if kind == "local" else res.control
                index = jnp.where(used, c_ids, store_size)
                store = jax.tree.map(lambda s, v: s.at[index].set(v.astype(s.dtype), mode="drop"), store, written)
            return (totals, store), kept

        (totals, store), kept = jax.lax.scan(body, (totals, store), xs)
        if kept is not None:
            kept = jax.tree.map(lambda x: x.reshape((padded,) + x.shape[2:]), kept)
        return totals, store, kept

    def _apply(self, state, params, totals, kept, store, hyper, k_agg, cohort) -> ServerState:
        """The new server state from the round's totals."""
        fed, kind = self.fed, stream.rule(self.fed)
        tree, opt_state, delta_acc, control = state.trainable, state.opt_state, state.adapter_delta, state.control
        if kind != "local":
            mean, empty = stream.mean_delta(totals, kept, fed, state.trainable, k_agg, hyper.dp_noise, cohort)
            if kind == "scaffold":
                mean_dy, sum_dc = mean
                tree = jax.tree.map(
                    lambda x, d: jnp.where(empty, x, x + hyper.server_lr * d).astype(x.dtype), tree, mean_dy
                )
                control = jax.tree.map(lambda c, s: (c + s / self.n_clients).astype(c.dtype), control, sum_dc)
            elif kind == "exact_lora":
                scale = self.peft_full.lora_scale
                grown = jax.tree.map(lambda acc, d: acc + hyper.server_lr * scale * d, delta_acc, mean)
                delta_acc = aggregate.select_tree(empty, delta_acc, grown)
                # FLoRA: clients merge the exact product and restart LoRA from a fresh shared A, B = 0.
                tree = self.learner.init(jax.random.fold_in(k_agg, 1), params)
            else:
                tx = server_opt.server_optimizer(fed.server_optimizer, hyper.server_lr)
                tree, opt_state = server_opt.server_update(tx, tree, opt_state, mean, empty)
        return ServerState(tree, opt_state, delta_acc, control, store, state.round + 1, state.key)

    # ----------------------------------------------------------------------------------------
    # Many rounds, evaluation, costs
    # ----------------------------------------------------------------------------------------
    def run_rounds(
        self, state: ServerState, params, data: FedData, n_rounds: int, hyper: Optional[Hyper] = None, server_data=None
    ):
        """`n_rounds` rounds in one `lax.scan` (jit this; `n_rounds` static)."""
        hyper = hyper if hyper is not None else Hyper.from_config(self.fed)
        return jax.lax.scan(lambda s, _: self.round(s, params, data, hyper, server_data), state, None, length=n_rounds)

    def eval_nll(
        self, state: ServerState, params, tokens: jax.Array, mask: jax.Array, level: Optional[int] = None, client=None
    ):
        """Summed held-out NLL and token count: the global tree plugged into the full model
        (level None) or run on emulator `level`; `client` i evaluates local-only client i's own
        tree instead. `tokens`/`mask`: (E, T), in batches of `FedConfig.eval_batch`."""
        tree = state.trainable if client is None else jax.tree.map(lambda x: x[client], state.clients)
        return self.learner.eval_nll(tree, self.base_params(state, params), tokens, mask, level)

    def bytes_per_round(self, participants: int) -> dict:
        """Bytes each way for `participants` devices (float32 trainable tree; FFA-LoRA sends only B)."""
        up = 4 * self.learner.param_count() * participants
        down = up
        if self.fed.lora_aggregation == "exact":  # FLoRA sends the stacked factors (A and B) down
            down = 4 * self.peft_full.replace(lora_freeze_a=False).param_count(self.model) * participants * participants
        return {"bytes_up": up, "bytes_down": down}
