"""FedPEAT rounds: every sampled client tunes its PEFT state on its emulator, in one jitted call.

One round (`FedPEAT.round`):
  1. sample clients deterministically from (seed, round), separately for each emulator level,
     into a fixed number of slots per level (`FedConfig.slots`): shapes stay static and each
     client pays for its own emulator only;
  2. each level's clients run `client.local_train` vmapped over the client axis, with that
     level's emulator shared (`in_axes=None`); optionally the server trains on its own data with
     the full model and joins as one more client;
  3. the deltas are aggregated (FedAvg / robust / DP / secure sum / exact LoRA) with non-finite
     clients dropped, and a FedOpt server optimizer applies the mean delta.

Several rounds run inside one jitted `lax.scan` (`run_rounds`); the host loop in `run` only
evaluates, logs, checkpoints and shows progress. Everything a run needs beyond the static configs
is an argument (params, data, `Hyper`), so `jax.vmap` over seeds and hyperparameters works.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from fedpeat_jax import peft as peft_lib
from fedpeat_jax.config import FedConfig, GPT2Config, PeftConfig
from fedpeat_jax.fed import aggregate, privacy
from fedpeat_jax.fed.client import Hyper, local_train
from fedpeat_jax.fed.sharding import constrain_clients
from fedpeat_jax.model import gpt2
from fedpeat_jax.peat.emulator import EmulatorSpec, build as build_emulator


class FedData(NamedTuple):
    """Client data with a leading client axis (padded, masked)."""

    tokens: jax.Array  # (C, N, T) int32
    mask: jax.Array  # (C, N, T) float32, 1 on real tokens
    counts: jax.Array  # (C,) int32, real examples per client
    levels: jax.Array  # (C,) int32, index into FedConfig.emulator_levels of the emulator each holds

    @classmethod
    def from_arrays(cls, tokens, mask, counts, levels=None) -> "FedData":
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.ndim != 3:
            raise ValueError(f"client tokens must be (clients, examples, seq_len), got shape {tokens.shape}")
        counts = jnp.asarray(counts, jnp.int32)
        levels = jnp.zeros(tokens.shape[0], jnp.int32) if levels is None else jnp.asarray(levels, jnp.int32)
        return cls(tokens, jnp.asarray(mask, jnp.float32), counts, levels)


class ServerState(NamedTuple):
    peft: Any  # the global PEFT state
    opt_state: Any  # the server optimizer's state
    adapter_delta: Any  # exact-LoRA mode: dense deltas merged into the adapter kernels so far
    scaffold: Any  # SCAFFOLD control variates (None unless algorithm == "scaffold")
    round: jax.Array  # () int32, rounds done
    key: jax.Array  # the run's base key; round r uses fold_in(key, r)


class RoundMetrics(NamedTuple):
    loss: jax.Array  # mean local training loss of the clients that took part
    participants: jax.Array  # clients whose update entered the aggregate
    examples: jax.Array  # training examples those clients hold (the round's data)
    dropped: jax.Array  # clients dropped for a non-finite update
    update_norm: jax.Array  # norm of the applied mean delta
    lora_gap: jax.Array  # relative ||mean(a) mean(b) - mean(a b)|| (0 when not LoRA)


def _tree_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


class FedPEAT:
    """A FedPEAT simulation of one model, PEFT kind and federated configuration.

    >>> sim = FedPEAT(params, model_cfg, peft_cfg, fed_cfg)
    >>> state = sim.init(jax.random.key(0))
    >>> state, metrics = sim.run_rounds(state, data, n_rounds=5)
    """

    def __init__(self, params, model: GPT2Config, peft: PeftConfig, fed: FedConfig, n_clients: Optional[int] = None, mesh=None):
        # Validate everything before anything is traced or compiled.
        model.validate()
        peft.validate(model.replace(n_layer=fed.adapter_l + fed.adapter_r + 1))
        fed.validate(n_clients=n_clients, model=model)
        gpt2.check_params(params, model)
        if peft.kind in ("prompt", "none"):
            raise ValueError(f"FedPEAT tunes a PEFT module inside the adapter blocks; kind {peft.kind!r} has none")
        if fed.lora_aggregation == "exact":
            if peft.kind != "lora":
                raise ValueError("FedConfig.lora_aggregation='exact' needs PeftConfig.kind='lora'")
            if fed.server_optimizer != "fedavg" or fed.aggregation != "mean" or fed.dp_clip is not None or fed.algorithm == "scaffold":
                raise ValueError("exact LoRA aggregation (FLoRA) combines only with server_optimizer='fedavg', aggregation='mean', no DP and no SCAFFOLD")
        if fed.algorithm == "scaffold" and fed.client_optimizer != "sgd":
            raise ValueError("SCAFFOLD's control-variate update assumes plain SGD: set client_optimizer='sgd'")
        self.params, self.model, self.fed = params, model, fed
        self.specs = tuple(EmulatorSpec(model.n_layer, fed.adapter_l, fed.adapter_r, k) for k in fed.emulator_levels)
        self.peft_full = self.specs[0].full_peft(peft)  # PEFT on the full model's adapter blocks (plug-in)
        self.peft_emulators = tuple(spec.emulator_peft(peft) for spec in self.specs)
        self.n_clients = n_clients
        self.mesh = mesh  # a `sharding.client_mesh()` to split each round's clients over devices

    # ----------------------------------------------------------------------------------------
    # State
    # ----------------------------------------------------------------------------------------
    def init(self, key: jax.Array, hyper: Optional[Hyper] = None) -> ServerState:
        hyper = hyper if hyper is not None else Hyper.from_config(self.fed)
        k_peft, k_run = jax.random.split(key)
        state = peft_lib.init(k_peft, self.params, self.model, self.peft_full)
        tx = aggregate.server_optimizer(self.fed.server_optimizer, hyper.server_lr)
        delta = None
        if self.fed.lora_aggregation == "exact":
            delta = jax.tree.map(
                lambda t: jnp.zeros(t["a"].shape[:-1] + t["b"].shape[-1:], jnp.float32),
                state["blocks"]["lora"],
                is_leaf=lambda t: isinstance(t, dict) and "a" in t,
            )
        scaffold = None
        if self.fed.algorithm == "scaffold":
            scaffold = aggregate.scaffold_init(state, self._n_clients_required())
        return ServerState(state, tx.init(state), delta, scaffold, jnp.zeros((), jnp.int32), k_run)

    def _n_clients_required(self) -> int:
        if self.n_clients is None:
            raise ValueError("SCAFFOLD keeps a control variate per client: pass n_clients to FedPEAT")
        return self.n_clients

    def base_params(self, state: ServerState, level: Optional[int] = None):
        """Frozen weights the clients of `level` train on (the full model when level is None),
        with exact-LoRA deltas merged into the adapter kernels."""
        params = self.params
        if state.adapter_delta is not None:
            blocks = peft_lib.lora.add_to_kernels(params["blocks"], state.adapter_delta, self.specs[0].adapter_ids)
            params = dict(params, blocks=blocks)
        return params if level is None else build_emulator(params, self.specs[level])

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

    # ----------------------------------------------------------------------------------------
    # One round
    # ----------------------------------------------------------------------------------------
    @staticmethod
    def round_keys(state: ServerState):
        """(sample, train, server, aggregate) keys of the round `state.round`: every random draw
        of a run derives from (seed, round), which makes resume exact."""
        return jax.random.split(jax.random.fold_in(state.key, state.round), 4)

    @staticmethod
    def client_keys(k_train, level: int, n: int):
        """Keys of the `n` client slots of emulator level `level`."""
        return jax.random.split(jax.random.fold_in(k_train, level), n)

    def round(self, state: ServerState, data: FedData, hyper: Hyper, server_data=None, available=None, server_available=None):
        """One federated round (pure; jit it or scan it).

        `available` (C,) bool limits sampling to those clients; `server_available` () bool turns
        the server's own tuning (`FedConfig.server_participation`) off for this round when False.
        """
        fed = self.fed
        k_sample, k_train, k_server, k_agg = self.round_keys(state)
        groups = self.sample(k_sample, data.levels, available)

        states, counts, valid, losses, ids_all, controls = [], [], [], [], [], []
        for j, (ids, ok) in enumerate(groups):
            if ids.shape[0] == 0:
                continue
            train = functools.partial(
                local_train,
                model=self.specs[j].emulator_config(self.model),
                peft=self.peft_emulators[j],
                fed=fed,
                n_steps=fed.local_steps,
                batch=fed.local_batch,
            )
            control = None
            if state.scaffold is not None:
                control = (state.scaffold.c, aggregate.scaffold_cohort_controls(state.scaffold, ids))
            keys = self.client_keys(k_train, j, ids.shape[0])
            base = self.base_params(state, j)
            # Frozen base and global state shared (None); data, keys and control variates per client.
            in_axes = (None, None, 0, 0, 0, 0, None, None if control is None else (None, 0))
            per_client = constrain_clients((data.tokens[ids], data.mask[ids], data.counts[ids], keys), self.mesh)
            res = jax.vmap(lambda *a: train(*a[:-1], control=a[-1]), in_axes=in_axes)(
                base, state.peft, *per_client, hyper, control
            )
            states.append(res.peft)
            counts.append(data.counts[ids].astype(jnp.float32))
            valid.append(ok)
            losses.append(res.loss)
            ids_all.append(ids)
            controls.append(res.control)

        if fed.server_participation:
            if server_data is None:
                raise ValueError("FedConfig.server_participation needs server_data (tokens, mask) for the server's own tuning")
            s_tokens, s_mask = server_data
            res = local_train(
                self.base_params(state), state.peft, s_tokens, s_mask, jnp.int32(s_tokens.shape[0]), k_server, hyper,
                model=self.model, peft=self.peft_full, fed=fed, n_steps=fed.local_steps, batch=fed.server_batch,
            )
            states.append(jax.tree.map(lambda x: x[None], res.peft))
            counts.append(jnp.asarray([s_tokens.shape[0]], jnp.float32))
            valid.append(jnp.ones((1,), bool) if server_available is None else jnp.reshape(server_available, (1,)).astype(bool))
            losses.append(res.loss[None])

        clients = jax.tree.map(lambda *xs: jnp.concatenate(xs), *states)
        counts = jnp.concatenate(counts)
        valid = jnp.concatenate(valid)
        losses = jnp.concatenate(losses)
        mask = valid.astype(jnp.float32)
        deltas = aggregate.client_deltas(clients, state.peft)

        new_peft, opt_state, delta_acc, scaffold, agg = self._aggregate(state, clients, deltas, counts, mask, hyper, k_agg, ids_all, controls)
        used = agg.weights > 0
        n_used = used.sum()
        metrics = RoundMetrics(
            loss=jnp.where(n_used > 0, jnp.sum(jnp.where(used, losses, 0.0)) / jnp.maximum(n_used, 1), jnp.nan),
            participants=n_used.astype(jnp.int32),
            examples=jnp.sum(jnp.where(used, counts, 0.0)),
            dropped=agg.dropped.sum().astype(jnp.int32),
            update_norm=_tree_norm(jax.tree.map(lambda a, b: a - b, new_peft, state.peft)),
            lora_gap=self._lora_gap(clients, counts, mask),
        )
        new_state = ServerState(new_peft, opt_state, delta_acc, scaffold, state.round + 1, state.key)
        return new_state, metrics

    def _lora_gap(self, clients, counts, mask):
        if self.peft_full.kind != "lora" or self.peft_full.lora_freeze_a or not self.fed.log_lora_gap:
            return jnp.zeros(())
        return aggregate.lora_gap(clients["blocks"]["lora"], counts, mask).total_rel

    def _aggregate(self, state, clients, deltas, counts, mask, hyper, key, ids_all, controls):
        """Aggregate the round's deltas into a new global state. Returns
        (peft, opt_state, adapter_delta, scaffold, AggregateResult)."""
        fed = self.fed
        if fed.algorithm == "scaffold":
            n_train = sum(int(i.shape[0]) for i in ids_all)  # the server (if any) keeps no control variate
            client_part = jax.tree.map(lambda x: x[:n_train], clients)
            new_peft, scaffold, agg = aggregate.scaffold_server_update(
                state.scaffold, state.peft, client_part, jax.tree.map(lambda *xs: jnp.concatenate(xs), *controls),
                jnp.concatenate(ids_all), mask[:n_train], counts[:n_train], hyper.server_lr,
            )
            return new_peft, state.opt_state, None, scaffold, agg

        if fed.lora_aggregation == "exact":
            lora = clients["blocks"]["lora"]
            agg = aggregate.lora_product_mean(lora, counts, mask, scale=self.peft_full.lora_scale)
            grown = jax.tree.map(lambda acc, d: acc + hyper.server_lr * d, state.adapter_delta, agg.mean)
            delta_acc = aggregate.select_tree(agg.empty, state.adapter_delta, grown)
            # FLoRA: clients merge the exact product and restart LoRA from a fresh shared A, B = 0.
            fresh = peft_lib.init(jax.random.fold_in(key, 1), self.params, self.model, self.peft_full)
            return fresh, state.opt_state, delta_acc, None, agg

        if fed.dp_clip is not None:
            dp = privacy.dp_fedavg(key, deltas, fed.dp_clip, hyper.dp_noise, mask=mask)
            agg = aggregate.AggregateResult(dp.mean, mask * (~dp.dropped) / jnp.maximum(dp.num_used, 1.0), dp.dropped, dp.empty)
        elif fed.aggregation == "median":
            agg = aggregate.coordinate_median(deltas, mask)
        elif fed.aggregation == "trimmed_mean":
            agg = aggregate.trimmed_mean(deltas, fed.trim_fraction, mask)
        elif fed.aggregation == "norm_bound":
            agg = aggregate.norm_bounded_mean(deltas, fed.norm_bound, counts, mask)
        else:
            agg = aggregate.fedavg(deltas, counts, mask)
            if fed.secure_aggregation:
                # The server only learns the sum of masked, weighted uploads; masks cancel in it.
                weighted = jax.tree.map(lambda d: d * aggregate._expand(agg.weights, d), deltas)
                summed, _ = privacy.secure_sum(jax.random.fold_in(key, 2), weighted, agg.weights > 0)
                agg = agg._replace(mean=summed)
        tx = aggregate.server_optimizer(fed.server_optimizer, hyper.server_lr)
        new_peft, opt_state = aggregate.server_update(tx, state.peft, state.opt_state, agg.mean, agg.empty)
        return new_peft, opt_state, state.adapter_delta, state.scaffold, agg

    # ----------------------------------------------------------------------------------------
    # Many rounds, evaluation
    # ----------------------------------------------------------------------------------------
    def run_rounds(self, state: ServerState, data: FedData, n_rounds: int, hyper: Optional[Hyper] = None, server_data=None):
        """`n_rounds` rounds in one `lax.scan` (jit this; `n_rounds` static)."""
        hyper = hyper if hyper is not None else Hyper.from_config(self.fed)

        def body(s, _):
            return self.round(s, data, hyper, server_data)

        return jax.lax.scan(body, state, None, length=n_rounds)

    def eval_nll(self, state: ServerState, tokens: jax.Array, mask: jax.Array, level: Optional[int] = None):
        """Summed held-out NLL and token count: plug-in (full model, level None) or on emulator
        `level`. `tokens`/`mask`: (E, T), evaluated in batches of `FedConfig.eval_batch`."""
        model = self.model if level is None else self.specs[level].emulator_config(self.model)
        pc = self.peft_full if level is None else self.peft_emulators[level]
        return gpt2.evaluate_nll(self.base_params(state, level), state.peft, tokens, mask, model, pc, self.fed.eval_batch)

    def bytes_per_round(self, participants: int) -> dict:
        """Bytes each way for `participants` devices (float32 PEFT state; FFA-LoRA sends only B)."""
        trained = self.peft_full.param_count(self.model)
        up = 4 * trained * participants
        down = up
        if self.fed.lora_aggregation == "exact":  # FLoRA sends the stacked factors down
            down = 4 * peft_lib.count(jax.eval_shape(lambda: peft_lib.init(jax.random.key(0), self.params, self.model, self.peft_full))) * participants * participants
        return {"bytes_up": up, "bytes_down": down}
