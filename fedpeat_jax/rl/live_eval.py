"""Controllers in the live environment: run a policy for real FedPEAT rounds, compare several
from the same start, and report (markdown table, plot). See :mod:`fedpeat_jax.mec.live`."""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from fedpeat_jax.io.plots import pyplot
from fedpeat_jax.mec.env import FedPEATMEC
from fedpeat_jax.mec.params import EnvParams
from fedpeat_jax.mec.spaces import decode_action
from fedpeat_jax.rl import baselines as B
from fedpeat_jax.rl.baselines import as_policy

BASELINES = ("best_rule", "greedy", "all_devices", "server_only", "random")


def baselines(
    env: FedPEATMEC, names, search_episodes: int = 64, seed: int = 0, surrogate: Optional[EnvParams] = None
) -> dict:
    """The named baselines for a live environment; "best_rule" is searched on ``surrogate`` (default:
    the calibrated surrogate with the live environment's parameters; a search in real rounds would
    cost hours)."""
    from fedpeat_jax.rl.rules import search_rules

    available = B.baseline_policies(env)
    out = {}
    for name in names:
        if name == "best_rule":
            on = env.default_params.surrogate() if surrogate is None else surrogate
            found = search_rules(FedPEATMEC(on), episodes=search_episodes, rng=seed)
            out[name] = found["policy"]._replace(name=f"best_rule: {found['description']}")
        elif name in available:
            out[name] = available[name]
        else:
            raise ValueError(f"unknown live baseline {name!r}; choose from {BASELINES}")
    return out


def run_policy(
    env: FedPEATMEC,
    policy,
    rounds: int,
    seed: int = 0,
    params: Optional[EnvParams] = None,
    show_progress: bool = True,
    desc: str = "live rounds",
) -> list:
    """Step ``env`` ``rounds`` times with ``policy`` (any policy of :mod:`fedpeat_jax.rl.baselines`);
    returns one dict per round: round, reward, the action's choices and every info scalar."""
    from fedpeat_jax.io.logging import progress

    policy = as_policy(policy)
    params = env.default_params if params is None else params
    act = jax.jit(
        lambda pp, ep, obs, state, key: policy.apply(pp, obs, state, ep, key)
    )  # params are arguments: a live env's hold weights
    key = jax.random.key(seed)
    key, k_reset = jax.random.split(key)
    obs, state = env.reset(k_reset, params)
    records, bar = [], progress(rounds, desc, disable=not show_progress)
    for t in range(rounds):
        key, k_act, k_step = jax.random.split(key, 3)
        action = act(policy.params, params, obs, state, k_act)
        obs, state, reward, _, _, info = env.step(k_step, state, action, params)
        choice = decode_action(np.asarray(action), env.n_devices)
        records.append(
            {
                "round": t + 1,
                "reward": float(reward),
                "devices": int(np.sum(choice["participate"])),
                "server": int(choice["server"]),
                **{k: float(v) for k, v in info.items() if np.ndim(v) == 0},
            }
        )
        bar.update(1)
        bar.set_postfix(ppl=f"{records[-1]['perplexity']:.1f}", latency=f"{records[-1]['latency']:.2f}s")
    bar.close()
    return records


def summarize(records: list) -> dict:
    """One live episode's totals and means (the columns of :func:`to_markdown`)."""
    col = lambda k: np.asarray([r[k] for r in records], np.float64)  # noqa: E731
    return {
        "return": float(col("reward").sum()),
        "mean_perplexity": float(col("perplexity").mean()),
        "final_perplexity": float(records[-1]["perplexity"]),
        "final_surrogate_perplexity": float(records[-1]["surrogate_perplexity"]),
        "mean_latency_s": float(col("latency").mean()),
        "total_latency_s": float(col("latency").sum()),
        "violations": int(col("violations").sum()),
        "stragglers": int(col("stragglers").sum()),
        "clients_trained": int(col("clients_trained").sum()),
    }


def compare(env: FedPEATMEC, policies: dict, rounds: int, seed: int = 0, show_progress: bool = True) -> dict:
    """Run each policy for ``rounds`` rounds from the same reset (same devices and channels draws);
    returns {"rounds", "seed", "policies": {name: {"records": [...], "summary": {...}}}}."""
    out = {"rounds": int(rounds), "seed": int(seed), "policies": {}}
    for name, policy in policies.items():
        records = run_policy(env, policy, rounds, seed=seed, show_progress=show_progress, desc=f"live: {name}")
        out["policies"][name] = {"records": records, "summary": summarize(records)}
    return out


def to_markdown(result: dict, ppl0: float) -> str:
    rows = [
        f"# Live FedPEAT rounds ({result['rounds']} rounds, seed {result['seed']}; zero-shot plug-in perplexity {ppl0:.2f})",
        "",
        "| policy | return | mean perplexity (real) | final perplexity (real) | final perplexity (surrogate) | mean latency (s) | total latency (s) | stragglers | violations | client updates |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p in result["policies"].items():
        s = p["summary"]
        rows.append(
            f"| {name} | {s['return']:.2f} | {s['mean_perplexity']:.2f} | {s['final_perplexity']:.2f} | "
            f"{s['final_surrogate_perplexity']:.2f} | {s['mean_latency_s']:.3f} | {s['total_latency_s']:.1f} | "
            f"{s['stragglers']} | {s['violations']} | {s['clients_trained']} |"
        )
    rows += [
        "",
        "Real: the held-out plug-in perplexity measured after each real round. Surrogate: what the calibrated "
        "response model predicts for the same round from the previous real perplexity.",
    ]
    return "\n".join(rows) + "\n"


def plot(result: dict, path) -> None:
    """Real and surrogate perplexity per round for each policy (PNG)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for _i, (name, p) in enumerate(result["policies"].items()):
        rounds = [r["round"] for r in p["records"]]
        (line,) = ax.plot(rounds, [r["perplexity"] for r in p["records"]], marker="o", label=f"{name} (real)")
        ax.plot(
            rounds,
            [r["surrogate_perplexity"] for r in p["records"]],
            ls="--",
            color=line.get_color(),
            label=f"{name} (surrogate)",
        )
    ax.set_xlabel("round")
    ax.set_ylabel("held-out plug-in perplexity")
    ax.set_title("Live FedPEAT rounds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["compare", "plot", "run_policy", "to_markdown"]
