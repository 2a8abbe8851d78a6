"""What a controller does: its choices against the devices' channel, compute, data and memory.

``collect`` runs a policy for whole episodes and keeps, every round, the state it saw and the
action it took; ``summarize`` reduces that to participation rates by quartile of channel gain,
compute speed and data size and by memory class, the emulator sizes and bandwidth levels it gave,
and round-by-round curves; ``plot`` draws them for several policies side by side
(``behaviour.png`` of :func:`fedpeat_jax.rl.controller.train_controller`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedpeat_jax.io.plots import pyplot
from fedpeat_jax.mec import system
from fedpeat_jax.rl.baselines import as_policy
from fedpeat_jax.rl.rollout import record_episodes

QUARTILES = ("lowest", "2nd", "3rd", "highest")


def _seen(obs, state, action, reward, done, info) -> dict:
    """What a round shows of the devices (before it), the choice made and what it brought."""
    n = state.gain.shape[-1]
    return {
        "gain_db": system.to_db(state.gain, jnp),
        "flops": state.flops,
        "mem_capacity": state.mem_capacity,
        "data": state.data,
        "stored_level": state.stored_level,
        "time": state.time,
        "server": action[:, 0],
        "participate": action[:, 1 : n + 1],
        "level": action[:, n + 1 : 2 * n + 1],
        "bandwidth": action[:, 2 * n + 1 :],
        "reward": reward,
        "perplexity": info["perplexity"],
        "latency": info["latency"],
        "stragglers": info["stragglers"],
    }


def collect(policy, env, env_params=None, episodes: int = 64, rng=0) -> dict:
    """Run ``policy`` for ``episodes`` whole episodes; numpy arrays (rounds, episodes[, devices])."""
    p = as_policy(policy)
    env_params = env.default_params if env_params is None else env_params
    num_steps = int(np.asarray(env_params.max_steps_in_episode))
    key = jax.random.key(int(rng)) if isinstance(rng, (int, np.integer)) else rng
    records = record_episodes(p.apply, env, int(episodes), num_steps, p.params, env_params, key, _seen)
    return jax.tree.map(np.asarray, records)


def _rate_by_quartile(feature: np.ndarray, chosen: np.ndarray) -> list:
    edges = np.quantile(feature, [0.25, 0.5, 0.75])
    bins = np.digitize(feature, edges)
    return [float(chosen[bins == b].mean()) if np.any(bins == b) else float("nan") for b in range(4)]


def summarize(records: dict, env_params) -> dict:
    """Participation by quartile of channel, compute and data and by memory class; the emulator
    sizes and bandwidth levels given; participants, server, perplexity and latency per round."""
    part = records["participate"].astype(np.float64)
    level_k = np.asarray(env_params.level_k, np.float64)
    k = level_k[records["level"]]
    mem_choices = np.asarray(env_params.mem_choices, np.float64)
    mem_class = np.argmin(np.abs(records["mem_capacity"][..., None] - mem_choices), axis=-1)
    on = part > 0
    by_class = {}
    for c in range(len(mem_choices)):
        sel = mem_class == c
        by_class[f"{mem_choices[c] / 1e6:.0f} MB"] = {
            "participation": float(part[sel].mean()) if sel.any() else float("nan"),
            "mean_k": float(k[sel & on].mean()) if (sel & on).any() else float("nan"),
        }
    prev = np.concatenate([np.zeros_like(part[:1]), part[:-1]])
    return {
        "participation_by_channel": _rate_by_quartile(records["gain_db"], part),
        "participation_by_compute": _rate_by_quartile(records["flops"], part),
        "participation_by_data": _rate_by_quartile(records["data"], part),
        "by_memory_class": by_class,
        "bandwidth_level_by_channel": _rate_by_quartile(
            records["gain_db"][on], records["bandwidth"][on].astype(np.float64)
        )
        if on.any()
        else [float("nan")] * 4,
        "repeat_participation": float(part[1:][prev[1:] > 0].mean()) if (prev[1:] > 0).any() else float("nan"),
        "devices_per_round": part.sum(-1).mean(-1).tolist(),
        "server_per_round": records["server"].astype(np.float64).mean(-1).tolist(),
        "perplexity_per_round": records["perplexity"].mean(-1).tolist(),
        "latency_per_round": records["latency"].mean(-1).tolist(),
        "stragglers_per_round": records["stragglers"].mean(-1).tolist(),
    }


def plot(records: dict, env_params, path) -> None:
    """Panels for each policy of ``records`` ({name: collect(...)}), side by side."""
    plt = pyplot()
    summaries = {name: summarize(r, env_params) for name, r in records.items()}
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5))
    names = list(summaries)
    width = 0.8 / max(len(names), 1)
    x = np.arange(4)
    bars = [
        ("participation_by_channel", "participation rate", "channel gain quartile"),
        ("participation_by_compute", "participation rate", "compute speed quartile"),
        ("participation_by_data", "participation rate", "data size quartile"),
        ("bandwidth_level_by_channel", "bandwidth level index (participants)", "channel gain quartile"),
    ]
    for ax, (key, ylabel, xlabel) in zip(axes[0], bars):
        for i, name in enumerate(names):
            ax.bar(x + (i - (len(names) - 1) / 2) * width, summaries[name][key], width, label=name)
        ax.set_xticks(x, QUARTILES)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    classes = list(next(iter(summaries.values()))["by_memory_class"])
    xc = np.arange(len(classes))
    for i, name in enumerate(names):
        axes[1][0].bar(
            xc + (i - (len(names) - 1) / 2) * width,
            [summaries[name]["by_memory_class"][c]["mean_k"] for c in classes],
            width,
            label=name,
        )
    axes[1][0].set_xticks(xc, classes)
    axes[1][0].set_xlabel("device memory capacity")
    axes[1][0].set_ylabel("emulator size k given (participants)")
    axes[1][0].grid(axis="y", alpha=0.3)
    rounds = np.arange(1, len(next(iter(summaries.values()))["devices_per_round"]) + 1)
    for name in names:
        s = summaries[name]
        (line,) = axes[1][1].plot(rounds, s["devices_per_round"], label=f"{name}: devices")
        axes[1][1].plot(rounds, s["server_per_round"], ls="--", color=line.get_color(), label=f"{name}: server")
        axes[1][2].plot(rounds, s["perplexity_per_round"], label=name)
        axes[1][3].plot(rounds, s["latency_per_round"], label=name)
    axes[1][1].set_ylabel("devices taking part (dashed: server rate)")
    axes[1][2].set_ylabel("held-out perplexity (surrogate)")
    axes[1][3].set_ylabel("round latency (s)")
    for ax in axes[1][1:]:
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("What the controllers do (evaluation episodes, same draws)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["collect", "plot", "summarize"]
