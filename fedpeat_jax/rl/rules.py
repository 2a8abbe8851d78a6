"""Simple fixed rules for the FedPEAT MEC environment, and a search for the best of them.

A rule applies the same recipe every round, reading only the devices' current state:

* ``server``  the server takes part (1) or not (0);
* ``score``   how devices are ranked: by channel gain, compute speed, data size, or by the shortest
              estimated round time (download if its emulator must be exchanged, training, upload,
              with an equal share of the band among the chosen devices);
* ``n``       how many of the best-ranked devices take part (0: none);
* ``level``   the emulator level each chosen device gets: a fixed level j (devices that cannot hold
              it are skipped), or ``m`` = the largest level that fits each device's memory;
* ``bw``      bandwidth: equal shares (0), or the top level for devices that download an emulator
              this round and the lowest for the others (1).

The rule's numbers are a pytree (:class:`Rule`), traced when a policy is evaluated, so every rule
of a grid runs in one compiled, vmapped call (:func:`search_rules`). The named baselines of
:mod:`fedpeat_jax.rl.baselines` (server only, all devices, greedy by channel) are rules too.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedpeat_jax.mec import system
from fedpeat_jax.mec.params import level_memory_bytes
from fedpeat_jax.rl.rollout import Policy, rollout_many

SCORES = ("channel", "compute", "data", "fastest")
BANDWIDTH_RULES = ("equal", "exchange_first")


@struct.dataclass
class Rule:
    """One simple rule (int32 scalars; a stack of them has a leading axis). See the module docstring."""

    server: jax.Array
    score: jax.Array  # index into SCORES
    n: jax.Array
    level: jax.Array  # 0..m-1 fixed, m: the largest that fits
    bw: jax.Array  # index into BANDWIDTH_RULES

    @classmethod
    def of(cls, server: int, score: str, n: int, level: int, bw: str = "equal") -> Rule:
        if score not in SCORES:
            raise ValueError(f"rule score must be one of {SCORES}, got {score!r}")
        if bw not in BANDWIDTH_RULES:
            raise ValueError(f"rule bandwidth must be one of {BANDWIDTH_RULES}, got {bw!r}")
        i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
        return cls(i32(int(server)), i32(SCORES.index(score)), i32(n), i32(level), i32(BANDWIDTH_RULES.index(bw)))

    @classmethod
    def of_fields(cls, fields: dict) -> Rule:
        """The rule of :meth:`fields` (e.g. read back from a summary JSON)."""
        return cls(**{k: jnp.asarray(int(v), jnp.int32) for k, v in fields.items()})

    def fields(self) -> dict:
        """{field: int} of one rule."""
        return {f.name: int(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def describe(self, n_levels: int) -> str:
        level = int(self.level)
        lv = "largest fitting emulator" if level >= n_levels else f"emulator level {level}"
        who = (
            "no device"
            if int(self.n) == 0
            else f"top {int(self.n)} by {SCORES[int(self.score)]}, {lv}, {BANDWIDTH_RULES[int(self.bw)]} bandwidth"
        )
        return f"server {'on' if int(self.server) else 'off'}, {who}"


def _estimated_time(state, env_params, level, k, n_chosen):
    """Each device's round time if it took part with ``level`` at an equal 1/n share of the band."""
    p = env_params
    beta = 1.0 / jnp.maximum(n_chosen, 1).astype(jnp.float32)
    r_dl = system.downlink_rate(beta, state.gain, p.bandwidth_hz, p.bs_power_w, p.noise_psd_w_hz, jnp)
    r_ul = system.uplink_rate(beta, state.gain, p.bandwidth_hz, p.device_power_w, p.noise_psd_w_hz, jnp)
    p_dev = system.device_param_count(k, p.p_emb, p.p_blk, p.n_adapter)
    tokens = system.tokens_per_round(p.local_steps, p.batch_size, p.seq_len)
    t_cmp = system.compute_time(tokens, system.flops_per_token(p_dev, p.p_peft), state.flops, p.utilization)
    exchange = (state.stored_level != level).astype(jnp.float32)
    ones = jnp.ones_like(exchange)
    return system.device_latency(
        exchange, p.q_bits * p_dev, system.peft_bits(p.p_peft, p.q_bits), r_dl, t_cmp, r_ul, ones, jnp
    )


@dataclass(frozen=True)
class RuleApply:
    """``apply(rule, obs, state, env_params, rng) -> action`` of one environment (hashable)."""

    n_devices: int
    n_bw_levels: int

    def __call__(self, rule: Rule, obs, state, env_params, rng):
        level_k = jnp.asarray(env_params.level_k)
        m = level_k.shape[0]
        fits = level_memory_bytes(env_params)[None, :] <= state.mem_capacity[:, None]  # (N, m)
        largest = jnp.argmax(jnp.where(fits, level_k[None, :], -jnp.inf), axis=1)
        level = jnp.where(rule.level >= m, largest, jnp.minimum(rule.level, m - 1)).astype(jnp.int32)
        can = jnp.take_along_axis(fits, level[:, None], axis=1)[:, 0]
        k = level_k[level]
        scores = jnp.stack(
            [
                state.gain,
                state.flops,
                state.data,
                -_estimated_time(state, env_params, level, k, rule.n),
            ]
        )
        score = jnp.where(can, jnp.take(scores, rule.score, axis=0), -jnp.inf)
        rank = jnp.argsort(jnp.argsort(-score))  # 0 for the best device
        participate = ((rank < rule.n) & can).astype(jnp.int32)
        exchange = state.stored_level != level
        bw = jnp.where((rule.bw == 1) & exchange, self.n_bw_levels - 1, 0).astype(jnp.int32)
        return jnp.concatenate([jnp.reshape(rule.server, (1,)), participate, level, bw]).astype(jnp.int32)


def rule_policy(env, rule: Rule, name: str = "rule"):
    """A :class:`~fedpeat_jax.rl.baselines.Policy` applying ``rule`` every round."""

    return Policy(apply=RuleApply(int(env.n_devices), int(env.n_bw_levels)), params=rule, name=name)


def rule_grid(env) -> Rule:
    """Every rule of the family for ``env``: a stack with a leading axis.

    server {0, 1} x score (4) x n in 1..N x level (m fixed + largest fitting) x bandwidth (2), plus
    "server only" (n = 0, server on). "Nobody" (a penalized empty round) is left out.
    """
    n, m = int(env.n_devices), int(env.n_levels)
    rows = [(1, 0, 0, m, 0)]
    rows += list(
        itertools.product((0, 1), range(len(SCORES)), range(1, n + 1), range(m + 1), range(len(BANDWIDTH_RULES)))
    )
    cols = np.asarray(rows, np.int32).T
    return Rule(*(jnp.asarray(c) for c in cols))


def _take(rules: Rule, index) -> Rule:
    return jax.tree.map(lambda x: x[index], rules)


def search_rules(
    env,
    env_params=None,
    *,
    episodes: int = 32,
    finalists: int = 8,
    final_episodes: int = 256,
    rng=0,
    chunk: int = 256,
    show_progress: bool = False,
) -> dict:
    """The best rule of :func:`rule_grid` by mean episode return.

    Every rule runs ``episodes`` episodes (the same draws for all, key ``rng``); the ``finalists``
    best then run ``final_episodes`` more (key ``rng + 1``) and the best of those wins, so the
    winner is not a lucky pick of the first pass. Returns {"rule", "description", "policy",
    "screen": per-rule mean returns, "finals": [(index, return), ...]}.
    """
    from fedpeat_jax.io.logging import progress

    env_params = env.default_params if env_params is None else env_params
    rules = rule_grid(env)
    apply = RuleApply(int(env.n_devices), int(env.n_bw_levels))
    num_steps = int(np.asarray(env_params.max_steps_in_episode))
    total = int(rules.n.shape[0])
    chunk = min(int(chunk), total)
    returns, bar = [], progress(total, "rule search", disable=not show_progress)
    for start in range(0, total, chunk):
        index = np.minimum(np.arange(start, start + chunk), total - 1)  # the last chunk padded: one compile
        out = rollout_many(
            apply, env, episodes, num_steps, _take(rules, jnp.asarray(index)), env_params, jax.random.key(rng)
        )
        returns.append(np.asarray(out["return"]).mean(axis=1)[: total - start])
        bar.update(min(chunk, total - start))
    bar.close()
    screen = np.concatenate(returns)
    top = np.argsort(-screen)[: int(finalists)]
    out = rollout_many(
        apply, env, final_episodes, num_steps, _take(rules, jnp.asarray(top)), env_params, jax.random.key(rng + 1)
    )
    finals = np.asarray(out["return"]).mean(axis=1)
    best = int(top[int(np.argmax(finals))])
    rule = _take(rules, best)
    return {
        "rule": rule,
        "description": rule.describe(int(env.n_levels)),
        "policy": rule_policy(env, rule, "best_rule"),
        "screen": screen,
        "finals": list(zip(top.tolist(), finals.tolist())),
        "rules_searched": total,
    }


def greedy_n(n_devices: int) -> int:
    """The greedy baseline's default number of devices: ceil(N / 2)."""
    return int(math.ceil(n_devices / 2))


__all__ = ["BANDWIDTH_RULES", "Rule", "RuleApply", "SCORES", "greedy_n", "rule_grid", "rule_policy", "search_rules"]
