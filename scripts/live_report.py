"""The markdown sections of live.md that read only the payload (scripts/controller_study.py writes
live.json and live.md): the refitted surrogate's predictions for the evaluation episodes, the
data-aggregation iterations, and the refit itself."""

from __future__ import annotations


def predicted_markdown(payload: dict) -> str:
    rows = [
        "",
        "## Returns predicted by the last refitted surrogate for the same episodes",
        "",
        "Each policy run on the refitted surrogate from the live evaluation's starts (the same devices and channel "
        "draws), next to its measured live return: how well the model the controller was trained on ranks the "
        "policies where it matters.",
        "",
        "| policy | predicted (per episode) | measured (per episode) | predicted mean | measured mean |",
        "|---|---|---|---|---|",
    ]
    for name, pred in payload["predicted_returns"].items():
        meas = payload["per_episode_return"][name]
        rows.append(
            f"| {name} | {', '.join(f'{r:.2f}' for r in pred)} | {', '.join(f'{r:.2f}' for r in meas)} | "
            f"{sum(pred) / len(pred):.2f} | {sum(meas) / len(meas):.2f} |"
        )
    return "\n".join(rows) + "\n"


def iterations_markdown(payload: dict) -> str:
    rows = [
        "",
        "## Data aggregation: the controller's and its best competitor's live episodes added to the refit",
        "",
        "Each iteration refits the surrogate to every live episode so far, searches the best rule there, trains SABPPO "
        f"on it ({'from a clone of that rule' if payload['iterations'][0]['warm_start'] else 'from scratch'}), and (but "
        "the last) runs the chosen controller and that rule live, each on a fresh seed, and adds both "
        "episodes. Refit error: predicted minus measured perplexity on that episode, over the whole episode, before "
        "it was added.",
        "",
        "| iteration | episodes fitted | SABPPO on the surrogate (per seed) | best rule on the surrogate "
        "| live: policy | seed | return | devices / round | refit error: mean | RMS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, step in enumerate(payload["iterations"]):
        head = (
            f"| {i} | {step['episodes_fitted']} | {', '.join(f'{r:.2f}' for r in step['sabppo_on_surrogate'])} | "
            f"{step['best_rule_on_surrogate']:.2f} |"
        )
        played = [
            (n, step[k]) for n, k in (("controller", "controller_episode"), ("best rule", "rule_episode")) if k in step
        ]
        for j, (name, ep) in enumerate(played or [("-", None)]):
            err = ep and ep["refit_error"]["episode"]
            cells = (
                f" {name} | {ep['seed']} | {ep['return']:.2f} | {ep['devices_per_round']:.2f} | "
                f"{err['mean_ppl_error']:+.2f} | {err['rms_ppl_error']:.2f} |"
                if ep
                else " - | - | - | - | - | - |"
            )
            rows.append((head if j == 0 else "| | | | |") + cells)
    return "\n".join(rows) + "\n"


def refit_markdown(payload: dict) -> str:
    fit = payload["refit"]
    rows = [
        "",
        "## The surrogate refitted to live rounds",
        "",
        f"Data: {fit['transitions']} one-round transitions of {len(payload['collection'])} live episodes, each policy on "
        f"its own seed: " + "; ".join(f"seed {c['seed']}: {c['policy']}" for c in payload["collection"]) + ". "
        "Fitted: the levels' fixed points and rates, the drifts of repeated and of fresh few devices, the data "
        f"exponent and the server's fixed point and rate, one factor each (`mec.live_fit.fit_response`, horizon {fit['horizon']}, prior scale {fit['prior_scale']}, noise scale "
        f"{fit['noise_scale']}).",
        "",
        "| field | calibrated (shipped table) | refitted to live rounds |",
        "|---|---|---|",
    ]
    fmt = lambda v: ", ".join(f"{x:.3f}" for x in v) if isinstance(v, list) else f"{v:.3f}"  # noqa: E731
    rows += [f"| {n} | {fmt(f['table'])} | {fmt(f['fitted'])} |" for n, f in fit["fields"].items()]
    rows += [
        "",
        "Prediction error, predicted minus measured perplexity: over whole episodes (the surrogate run from each "
        "episode's start on the measured rounds' outcomes, as a controller plans) and one round at a time (from the "
        "measured previous perplexity).",
        "",
        "| data | surrogate | episode: mean | episode: RMS | round: mean | round: RMS |",
        "|---|---|---|---|---|---|",
    ]
    cells = lambda e: " | ".join(  # noqa: E731
        f"{e[h]['mean_ppl_error']:+.2f} | {e[h]['rms_ppl_error']:.2f}" for h in ("episode", "round")
    )
    rows += [
        f"| collection (fitted on) | {label} | {cells(fit[key])} |"
        for label, key in (("calibrated", "before"), ("refitted", "after"))
    ]
    for label, per_policy in payload["surrogate_check_on_evaluation"].items():
        rows += [f"| evaluation, {name} (not fitted on) | {label} | {cells(e)} |" for name, e in per_policy.items()]
    return "\n".join(rows) + "\n"
