"""Write docs/config.md: every option of every config dataclass, read from the code.

    python scripts/config_reference.py           # rewrite docs/config.md
    python scripts/config_reference.py --check   # exit 1 if docs/config.md is stale

For each config class the table lists its fields in source order with

* the `fedpeat` option(s) that set it: read from the argument parsers the CLI builds (each
  subcommand is started with a patched ``ArgumentParser.parse_args`` that stops before any work),
  so a flag renamed or prefixed by the CLI (``--distill-steps``) shows up exactly as typed;
* the annotated type and the default (the source expression when it is not a literal);
* the field's description, read from the source by ``fedpeat_jax.config.field_sources`` (its
  attribute docstring, else its ``# comment``, else its entry in the class docstring; the same
  text ``fedpeat COMMAND --help`` shows), or for the records that are not options (EnvParams,
  Hyper, HParams) a note kept in ``NOTES`` below;
* the constraints the class's own validation enforces, extracted from its error messages
  ("FedConfig.client_lr must be > 0").

Every frozen dataclass named ``*Config`` in ``fedpeat_jax`` is documented: those listed in ``SECTIONS``
in that order, any other one after them (so a new config class makes ``--check``, hence
``tests/test_docs.py``, fail until docs/config.md is regenerated).
Nothing is compiled; the script imports the package and builds the default ``EnvParams`` only.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import importlib
import inspect
import io
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # only arrays are built, never computed on

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
OUT = ROOT / "docs" / "config.md"
PACKAGE = ROOT / "fedpeat_jax"

# (module, class, one-line role). Order follows the data flow of docs/architecture.md.
SECTIONS = [
    ("fedpeat_jax.config", "GPT2Config", "Shape of the GPT-2 model (names follow transformers' GPT2Config)."),
    ("fedpeat_jax.config", "PeftConfig", "Which PEFT module is trained and in which blocks."),
    (
        "fedpeat_jax.data.source",
        "TextConfig",
        "Which text a run reads (Shakespeare, or your own folder of text files or one file), how it is cut into examples, and which documents are held out.",
    ),
    ("fedpeat_jax.tasks", "TaskConfig", "The federated downstream task: partition of the text into clients, windows."),
    (
        "fedpeat_jax.config",
        "FedConfig",
        "One federated run: sampling, local training, aggregation, privacy, emulators.",
    ),
    ("fedpeat_jax.peat.foundation", "PretrainConfig", "Pretraining of the project's own foundation model."),
    (
        "fedpeat_jax.peat.train",
        "TrainConfig",
        "The generic training loop behind pretraining, distillation and the offsite table (no CLI group of its own: PretrainConfig, DistillConfig and OffsiteConfig build it).",
    ),
    ("fedpeat_jax.peat.distill", "DistillConfig", "Emulator distillation (LM + kd_weight x KD)."),
    ("fedpeat_jax.peat.offsite", "OffsiteConfig", "The offsite-tuning table (Full ZS ... OT Plug-in)."),
    (
        "fedpeat_jax.mec.calibrate",
        "CalibrateConfig",
        "The real FedPEAT runs that calibrate the MEC environment's perplexity response.",
    ),
    (
        "fedpeat_jax.mec.params",
        "EnvParams",
        "Every number of the MEC environment (a pytree: vmappable, sweepable). Build it with `make_params` / `preset_params`, not by hand; see [system_model.md](system_model.md) for the equations. The CLI exposes only `--env-preset` and `--calibration` (`fedpeat train-controller`); set other fields in Python (`preset_params('default', w_latency=0.5)`) or sweep the float fields with `fedpeat sweep` (a spec of `kind: controller`, [sweep.md](sweep.md#the-controller-sabppo)).",
    ),
    (
        "fedpeat_jax.rl.sabppo",
        "SABPPOConfig",
        "Static settings of an SABPPO run and the defaults of its traced hyperparameters.",
    ),
    ("fedpeat_jax.rl.controller", "ControllerConfig", "How `train_controller` runs, checkpoints and evaluates SABPPO."),
    ("fedpeat_jax.quickstart", "QuickstartConfig", "Sizes of every stage of `fedpeat quickstart`."),
]
# Traced hyperparameter records (not options: built from the configs above, vmapped in sweeps).
TRACED = [
    (
        "fedpeat_jax.fed.client",
        "Hyper",
        "Numeric FedPEAT hyperparameters that `driver.study` vmaps over; `Hyper.from_config(fed)` fills them from FedConfig.",
    ),
    (
        "fedpeat_jax.rl.sabppo",
        "HParams",
        "Traced SABPPO hyperparameters; `default_hparams(config, env_params)` fills them from SABPPOConfig; `fedpeat sweep` (a spec of `kind: controller`) and `jax.vmap(trainer.train)` sweep them.",
    ),
]

# Descriptions of the fields of the records that are not config dataclasses (EnvParams, Hyper,
# HParams: not command-line options). Config dataclasses carry their descriptions on their fields
# (an attribute docstring or a `# comment`), which `fedpeat COMMAND --help` shows too.
NOTES = {
    "EnvParams": {
        "+cell_radius": "Cell radius R: devices are placed uniformly in the annulus [min_distance, cell_radius].",
        "+min_distance": "Minimum distance of a device from the base station.",
        "+mobility_step": "Random-walk step: (dx, dy) ~ U[-step, step]^2, distance clipped into [min_distance, cell_radius].",
        "+device_power_w": "Device transmit power, W.",
        "+bs_power_w": "Base-station transmit power, W, split over the devices in proportion to their shares.",
        "+n_adapter": "Adapter blocks on every device.",
        "+k_full": "Middle blocks of the full model; the server trains with k = k_full.",
        "+cal_k": "Calibrated emulator levels of the table.",
        "+cal_ppl_inf": "Converged plug-in perplexity per calibrated level.",
        "+cal_eta": "Rate of approach per calibrated level, per unit data fraction.",
        "+mem_choices": "Device memory capacities, one drawn uniformly per device at reset (make_params: one class per emulator level).",
        "max_steps_in_episode": "Rounds per episode T (truncation).",
        "n_devices": "Devices N (static: fixes array shapes; the server is extra).",
        "noise_psd_w_hz": "Noise power spectral density N0 in W/Hz (-174 dBm/Hz).",
        "pl_const_db": "Path-loss constant a in PL(d) = a + b log10(d / 1 km), dB.",
        "pl_exp_db": "Path-loss slope b, dB per decade of distance.",
        "min_fading": "Floor of the Rayleigh fading power |h|^2.",
        "flops_min": "Lower end of the device compute speed f ~ U[flops_min, flops_max], FLOP/s.",
        "flops_max": "Upper end of the device compute speed, FLOP/s.",
        "utilization": "Fraction of peak FLOP/s a device (and the server) achieves.",
        "data_min": "Lower end of the device data size D ~ U[data_min, data_max], examples (make_params: the calibrated population's).",
        "data_max": "Upper end of the device data size, examples.",
        "server_flops": "Server compute speed, FLOP/s.",
        "server_data": "Server data size, examples of its own domain (make_params: the calibrated size).",
        "srv_ppl_inf": "Fixed point the server's data pulls the perplexity towards (its domain's, from the table).",
        "srv_eta": "Rate of the server's pull per unit of server data / all devices' data (from the table).",
        "round_deadline": "Round deadline, s: later participants are dropped (stragglers) and the round is capped (make_params: `reference_latency`).",
        "server_enabled": "1: the server may take part (action branch 0); 0: it never does.",
        "local_steps": "Local steps per round.",
        "batch_size": "Sequences per local step.",
        "seq_len": "Tokens per sequence (make_params caps it at the model's n_positions).",
        "q_bits": "Bits per transmitted / stored parameter q.",
        "p_emb": "Token + position embedding parameters (`GPT2Config.embedding_param_count`).",
        "p_blk": "Parameters of one block (`GPT2Config.block_param_count`).",
        "p_peft": "Trainable PEFT parameters in the adapter (`PeftConfig.param_count`).",
        "n_embd": "Model width d (activation memory).",
        "n_head": "Attention heads a (activation memory).",
        "ppl0": "Plug-in perplexity before any round (the table's ppl0).",
        "w_ppl": "Reward weight of the perplexity gap (ppl - ppl_best) / (ppl_ref - ppl_best).",
        "w_latency": "Reward weight of latency / latency_ref.",
        "w_memory": "Reward weight of the mean memory ratio M_n / Mcap_n of the participating devices.",
        "w_violation": "Penalty per device whose memory need exceeds its capacity.",
        "w_empty": "Penalty for a round in which nobody (devices or server) takes part.",
        "ppl_ref": "Perplexity at which the gap term is 1 (make_params: the table's ppl0).",
        "ppl_best": "Perplexity at which the gap term is 0 (make_params: the table's lowest fixed point).",
        "latency_ref": "Latency scale of reward and observation (make_params: the round deadline).",
        "gain_db_center": "Channel gain (dB) mapped to 0 in the observation.",
        "gain_db_scale": "dB per unit of the normalized gain observation.",
    },
    "Hyper": {
        "client_lr": "From FedConfig.client_lr.",
        "server_lr": "From FedConfig.server_lr.",
        "prox_mu": "From FedConfig.prox_mu.",
        "dp_noise": "From FedConfig.dp_noise.",
    },
    "HParams": {
        "lr": "From SABPPOConfig.lr.",
        "ent_coef": "From SABPPOConfig.ent_coef.",
        "clip_eps": "From SABPPOConfig.clip_eps.",
        "vf_coef": "From SABPPOConfig.vf_coef.",
        "max_grad_norm": "From SABPPOConfig.max_grad_norm.",
        "gamma": "From SABPPOConfig.gamma.",
        "gae_lambda": "From SABPPOConfig.gae_lambda.",
    },
}


# =============================================================================================
# Source parsing
# =============================================================================================
@functools.cache
def _class_node(cls) -> tuple:
    """(ast.ClassDef, source of its file, ast of its file) of ``cls``."""
    path = inspect.getsourcefile(cls)
    source = Path(path).read_text()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            return node, source, tree
    raise LookupError(f"class {cls.__name__} not found in {path}")


def field_sources(cls) -> dict:
    """{field: {"doc", "default_src", "section", "annotation"}}: read from the class body by the
    library (`fedpeat_jax.config.field_sources`), the same descriptions the CLI's --help shows."""
    from fedpeat_jax.config import field_sources as parse

    return parse(cls)


# ---------------------------------------------------------------------------------------------
# Constraints from the validation messages
# ---------------------------------------------------------------------------------------------
def _render(node, module, subst: dict) -> str:
    """Text of a str constant / f-string; placeholders resolved where that is meaningful."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    parts = []
    for v in node.values:
        if isinstance(v, ast.Constant):
            parts.append(str(v.value))
            continue
        expr = v.value
        if isinstance(expr, ast.Name) and expr.id in subst:
            parts.append(subst[expr.id])
        elif isinstance(expr, ast.Name) and isinstance(getattr(module, expr.id, None), (tuple, str, int, float)):
            parts.append(repr(getattr(module, expr.id)))
        else:
            parts.append("{" + ast.unparse(expr) + "}")
    return "".join(parts)


def _messages(func: ast.AST, module, subst=None) -> list:
    """Every message string in ``func``, with ``for name in ("a", "b")`` loops expanded."""
    subst = dict(subst or {})
    out = []

    def visit(node, subst):
        if (
            isinstance(node, ast.For)
            and isinstance(node.target, ast.Name)
            and isinstance(node.iter, ast.Tuple)
            and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.iter.elts)
        ):
            for e in node.iter.elts:
                for child in node.body:
                    visit(child, {**subst, node.target.id: e.value})
            return
        if isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            out.append(_render(node, module, subst))
            return
        for child in ast.iter_child_nodes(node):
            visit(child, subst)

    visit(func, subst)
    return out


def _functions_for(cls, module) -> list:
    node, _, tree = _class_node(cls)
    funcs = [n for n in node.body if isinstance(n, ast.FunctionDef) and n.name in ("validate", "__post_init__")]
    if cls.__name__ == "EnvParams":
        funcs += [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "validate_params"]
    return funcs


def constraints(cls) -> dict:
    """{field: [constraint, ...]} from the messages of the class's validation code."""
    module = importlib.import_module(cls.__module__)
    fields = set(field_names(cls))
    sources = [(cls, f) for f in _functions_for(cls, module)]
    if hasattr(cls, "train_config"):  # PretrainConfig, DistillConfig, OffsiteConfig validate through TrainConfig
        from fedpeat_jax.peat.train import TrainConfig

        sources += [
            (TrainConfig, f) for f in _functions_for(TrainConfig, importlib.import_module(TrainConfig.__module__))
        ]
    out: dict = {}
    for owner, func in sources:
        for msg in _messages(func, importlib.import_module(owner.__module__)):
            for m in re.finditer(rf"(?:{owner.__name__}\.)?((?:\w+, )*\w+)(?: \([^)]*\))? (must|needs) (.+)", msg):
                text = m.group(2) + " " + m.group(3)
                text = re.split(r", got\b|, expected\b|; |: \{", text)[0].strip().rstrip(".")
                text = re.sub(r"=\{[^}]*\}", "", text)  # "steps={self.steps}" -> "steps"
                text = re.sub(r"(\b\w+) \(\{self\.\1\}\)", r"\1", text)  # "n_head ({self.n_head})" -> "n_head"
                text = re.sub(r"\{self\.(\w+)\}", r"\1", text)
                text = re.sub(r" ?\(?\{[^}]*\}\)?", "", text).strip()
                for name in m.group(1).split(", "):
                    if name in fields and text not in out.setdefault(name, []):
                        out[name].append(text)
    return out


# =============================================================================================
# Fields and defaults
# =============================================================================================
def field_names(cls) -> list:
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return list(cls._fields)


def _fmt_value(v) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.4g}"
        return repr(v)
    if isinstance(v, tuple):
        return "(" + ", ".join(_fmt_value(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    return repr(v)


def default_text(cls, name: str, src: dict) -> str:
    if dataclasses.is_dataclass(cls):
        f = {f.name: f for f in dataclasses.fields(cls)}[name]
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            return f"`{f.default_factory.__name__}()`"
        else:
            return "set by `make_params`" if cls.__name__ == "EnvParams" else "-"
    else:
        if name not in cls._field_defaults:
            return "-"
        value = cls._field_defaults[name]
    shown = _fmt_value(value)
    expr = (src.get(name) or {}).get("default_src")
    if expr is None or re.match(r"(\w+\.)?field\(", expr):
        return f"`{shown}`"
    try:
        ast.literal_eval(expr)
        return f"`{shown}`"
    except (ValueError, SyntaxError, TypeError):
        return f"`{expr}` = `{shown}`"


def type_text(cls, name: str) -> str:
    annotation = field_sources(cls).get(name, {}).get("annotation")
    if annotation:
        return f"`{annotation}`"
    if dataclasses.is_dataclass(cls):
        t = {f.name: f for f in dataclasses.fields(cls)}[name].type
    else:
        t = cls.__annotations__.get(name, "")
    t = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    return f"`{t}`"


# =============================================================================================
# CLI options, read from the parsers the CLI builds
# =============================================================================================
class _Stop(Exception):
    pass


def cli_parsers() -> dict:
    """{command: argparse parser as fully built}, without running any command."""
    from fedpeat_jax import cli

    parsers = {}
    original_parse, original_known = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    current = {}

    def parse_args(self, args=None, namespace=None):
        current["parser"] = self
        raise _Stop

    def parse_known_args(self, args=None, namespace=None):
        current["parser"] = self
        return original_known(self, args, namespace)

    argparse.ArgumentParser.parse_args = parse_args
    argparse.ArgumentParser.parse_known_args = parse_known_args
    try:
        for name, (fn, _) in sorted(cli.SUBCOMMANDS.items()):
            current.clear()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                try:
                    fn([])
                except (_Stop, SystemExit):
                    pass
            if "parser" not in current:
                raise RuntimeError(f"could not read the parser of `fedpeat {name}`")
            parsers[name] = current["parser"]
    finally:
        argparse.ArgumentParser.parse_args = original_parse
        argparse.ArgumentParser.parse_known_args = original_known
    return parsers


def help_texts() -> dict:
    """{command: what `fedpeat COMMAND --help` prints} (argparse exits right after printing)."""
    from fedpeat_jax import cli

    out = {}
    for name, (fn, _) in sorted(cli.SUBCOMMANDS.items()):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            try:
                fn(["--help"])
            except SystemExit:
                pass
        out[name] = buf.getvalue()
    return out


def cli_options(parsers: dict) -> tuple:
    """({class name: {field: [(command, flag, cli default)]}}, {command: [(section, class)]},
    {command: [(flag, help)]} of the options that are not config fields)."""
    fields: dict = {}
    groups: dict = {}
    plain: dict = {}
    for command, parser in parsers.items():
        groups[command], plain[command] = [], []
        grouped = set()
        for group in parser._action_groups:
            m = re.fullmatch(r"(\w+) \((\w+)\)", group.title or "")
            if not m:
                continue
            section, cls_name = m.groups()
            groups[command].append((section, cls_name))
            for action in group._group_actions:
                field = action.dest.split("__", 1)[1]
                shown = getattr(action, "shown_default", "")
                fields.setdefault(cls_name, {}).setdefault(field, []).append((command, action.option_strings[0], shown))
                grouped.add(action.dest)
        for action in parser._actions:
            if action.dest in grouped or action.dest == "help":
                continue
            flag = action.option_strings[0] if action.option_strings else action.dest.upper()
            text = action.help or ""
            if action.choices and "one of" not in text:
                text = (text + "; " if text else "") + "choices: " + ", ".join(map(str, action.choices))
            if action.default not in (None, False) and "default" not in text:
                text = (text + "; " if text else "") + f"default: {action.default}"
            plain[command].append((flag, text))
    return fields, groups, plain


def _cli_default_matches(value, shown: str) -> bool:
    text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return text == shown


# =============================================================================================
# Markdown
# =============================================================================================
def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _anchor(name: str) -> str:
    return name.lower()


def class_table(cls, role: str, cli_fields: dict, traced: bool = False) -> list:
    src = field_sources(cls)
    rules = {} if traced else constraints(cls)
    notes = NOTES.get(cls.__name__, {})
    module_path = Path(inspect.getsourcefile(cls)).resolve().relative_to(ROOT)
    lines = [f"## {cls.__name__}", "", f"[`{module_path}`](../{module_path}). {role}", ""]
    has_sections = any(s["section"] for s in src.values())
    header = ["option", "`fedpeat` flag", "type", "default", "description"]
    if not traced:
        header.insert(4, "constraint")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    missing_docs = []
    for name in field_names(cls):
        s = src.get(name, {})
        desc = s.get("doc") or notes.get(name, "")
        if notes.get("+" + name):  # a note that completes a terse code comment ("m", "(K,)")
            desc = notes["+" + name] + (f" [{desc}]" if desc else "")
        if not desc:
            missing_docs.append(name)
        if has_sections and s.get("section"):
            desc = f"*{s['section']}*: {desc}" if desc else f"*{s['section']}*"
        flags = []
        for command, flag, shown in cli_fields.get(cls.__name__, {}).get(name) or []:
            text = f"`fedpeat {command} {flag}`"
            default = getattr(_cli_base(cls, command), name, None)
            if not _cli_default_matches(default, shown):
                text += f" (default `{shown}`)"
            flags.append(text)
        row = [f"`{name}`", "<br>".join(flags) or "-", type_text(cls, name), default_text(cls, name, src)]
        if not traced:
            row.append("; ".join(rules.get(name, [])) or "")
        row.append(desc)
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    if missing_docs:
        print(f"note: {cls.__name__} fields without a description: {missing_docs}", file=sys.stderr)
    return lines + [""]


def _cli_base(cls, command):
    """The dataclass default instance, for comparing with what the CLI shows."""
    if dataclasses.is_dataclass(cls):
        try:
            return cls()
        except TypeError:
            return None
    return None


def preset_tables() -> list:
    from fedpeat_jax.config import GPT2_PRESETS
    from fedpeat_jax.peat.foundation import PRETRAIN_PRESETS, PretrainConfig
    from fedpeat_jax.quickstart import QuickstartConfig

    out = [
        "### GPT-2 presets (`GPT2Config.preset(name)`, `--preset`)",
        "",
        "| preset | n_layer | n_embd | n_head | vocab_size | n_positions | parameters |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in GPT2_PRESETS.items():
        out.append(
            f"| `{name}` | {c.n_layer} | {c.n_embd} | {c.n_head} | {c.vocab_size} | {c.n_positions} | {c.param_count():,} |"
        )
    base = PretrainConfig()
    out += [
        "",
        "### Pretraining presets (`PRETRAIN_PRESETS`, `fedpeat pretrain --preset`)",
        "",
        "Fields that differ from the PretrainConfig defaults above.",
        "",
        "| preset | settings |",
        "|---|---|",
    ]
    for name, c in PRETRAIN_PRESETS.items():
        diff = {f: getattr(c, f) for f in field_names(PretrainConfig) if getattr(c, f) != getattr(base, f)}
        out.append(f"| `{name}` | {', '.join(f'`{k}={_fmt_value(v)}`' for k, v in diff.items()) or 'the defaults'} |")
    q, t = QuickstartConfig(), QuickstartConfig.tiny()
    diff = {f: getattr(t, f) for f in field_names(QuickstartConfig) if getattr(t, f) != getattr(q, f)}
    out += [
        "",
        "### `fedpeat quickstart --tiny` (`QuickstartConfig.tiny()`)",
        "",
        "Changes these defaults: " + ", ".join(f"`{k}={_fmt_value(v)}`" for k, v in diff.items()) + ".",
        "",
    ]
    return out


def env_extras() -> list:
    """make_params arguments, MEC presets and the derived EnvParams of preset 'default'."""
    import numpy as np

    from fedpeat_jax.config import docstring_entries
    from fedpeat_jax.mec import params as env_mod

    sig = inspect.signature(env_mod.make_params)
    entries = docstring_entries(env_mod.make_params.__doc__)
    out = [
        "### `make_params` / `preset_params` arguments",
        "",
        "[`fedpeat_jax/mec/params.py`](../fedpeat_jax/mec/params.py). `preset_params(name, calibration, **overrides)` is `make_params` "
        "with a preset's arguments; `FedPEATMEC(preset=..., calibration=..., **overrides)` calls it. Any other EnvParams field "
        "can be passed as an override.",
        "",
        "| argument | default | description |",
        "|---|---|---|",
    ]
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            desc = entries.get(p.name, "")
            out.append(f"| `**{p.name}` | - | {_cell(desc)} |")
            continue
        desc = entries.get(p.name, "")
        if p.name == "model":
            desc = "GPT2Config or a GPT-2 preset name; sizes (p_emb, p_blk, n_embd, n_head, k_full) come from it."
        if p.name in ("l", "r"):
            desc = "Adapter split (bottom / top blocks); must match the calibration table's."
        if p.name == "n_devices":
            desc = "Devices N."
        if p.name == "mem_choices_gb":
            desc = "Device memory capacities (GB = 1e9 bytes), drawn uniformly per device."
        out.append(f"| `{p.name}` | `{_fmt_value(p.default)}` | {_cell(desc)} |")
    out += [
        "",
        "### MEC presets (`preset_params(name)`, `fedpeat train-controller --env-preset`)",
        "",
        "| preset | make_params arguments |",
        "|---|---|",
    ]
    for name, kw in env_mod.PRESETS.items():
        out.append(f"| `{name}` | {', '.join(f'`{k}={_fmt_value(v)}`' for k, v in kw.items())} |")
    params = env_mod.preset_params("default")
    out += [
        "",
        "Derived fields of `preset_params('default')` with the shipped calibration table "
        "([`fedpeat_jax/mec/calibration_default.json`](../fedpeat_jax/mec/calibration_default.json)), 4 significant digits:",
        "",
        "| field | value |",
        "|---|---|",
    ]
    for name in (
        "bw_weights",
        "mem_choices",
        "seq_len",
        "p_emb",
        "p_blk",
        "p_peft",
        "n_adapter",
        "k_full",
        "n_embd",
        "n_head",
        "level_k",
        "cal_k",
        "ppl0",
        "ppl_ref",
        "ppl_best",
        "srv_ppl_inf",
        "srv_eta",
        "server_data",
        "data_min",
        "data_max",
        "round_deadline",
        "latency_ref",
    ):
        v = np.asarray(getattr(params, name), dtype=np.float64)
        shown = ", ".join(f"{x:.4g}" for x in v.ravel()) if v.ndim else f"{float(v):.4g}"
        out.append(f"| `{name}` | {'[' + shown + ']' if v.ndim else shown} |")
    return out + [""]


def commands_section(groups: dict, plain: dict, cli_fields: dict, helps: dict) -> list:
    out = [
        "## Commands",
        "",
        "`fedpeat COMMAND --help` lists a command's options. Options from a config class are grouped by section; "
        '`--config FILE.json` takes one JSON object per section (e.g. `{"fed": {"rounds": 50}}`) and command-line '
        "options win over the file. A field name used by two sections of one command gets the section as prefix "
        "(`--offsite-steps`, `--distill-steps`). Tuples are given comma-separated (`--levels 0,2,4`); `none` sets an "
        "optional field to None; booleans take true/false.",
        "",
        "| command | config sections (`--config` keys) | other options |",
        "|---|---|---|",
    ]
    for command in sorted(groups):
        secs = ", ".join(f"`{s}` ([{c}](#{_anchor(c)}))" for s, c in groups[command]) or "-"
        other = "<br>".join(f"`{flag}`: {text}" if text else f"`{flag}`" for flag, text in plain[command])
        flags = [
            flag
            for _, c in groups[command]
            for entries in cli_fields.get(c, {}).values()
            for cmd, flag, _ in entries
            if cmd == command
        ]
        if flags and not any(flag in helps.get(command, "") for flag in flags):
            secs += " (accepted, but not listed by `--help`)"
        out.append(f"| `fedpeat {command}` | {secs} | {_cell(other)} |")
    return out + [""]


def discovered_configs() -> list:
    """(module, class, role) of ``*Config`` dataclasses in the package that SECTIONS does not list
    (documented after the listed ones, with the first line of their docstring as role)."""
    listed = {name for _, name, _ in SECTIONS}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ClassDef)
                and node.name.endswith("Config")
                and node.name not in listed
                and any("dataclass" in ast.unparse(d) for d in node.decorator_list)
            ):
                module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
                role = (ast.get_docstring(node) or "").strip().split("\n")[0]
                found.append((module, node.name, role))
    return found


def render() -> str:
    sections = SECTIONS + discovered_configs()
    parsers = cli_parsers()
    cli_fields, groups, plain = cli_options(parsers)
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/config_reference.py from the code; do not edit by hand. "
        "Regenerate with `python scripts/config_reference.py`; tests/test_docs.py fails when this file is stale. -->",
        "",
        "Every config is a frozen dataclass validated at construction: an invalid value raises `ValueError` naming the "
        "field before anything compiles (the CLI rewrites the name to the option you typed). Columns: the field; the "
        "`fedpeat` option(s) that set it, with the CLI's default where it differs from the dataclass default; the annotated "
        "type; the default; the constraints the class's own validation checks (read from its error messages; further "
        "checks against the model or the data happen when a run starts); and the field's comment in the code.",
        "",
        "Contents: [Commands](#commands), "
        + ", ".join(f"[{n}](#{_anchor(n)})" for _, n, _ in sections)
        + ", [traced hyperparameters](#traced-hyperparameters).",
        "",
    ]
    lines += commands_section(groups, plain, cli_fields, help_texts())
    for module, name, role in sections:
        cls = getattr(importlib.import_module(module), name)
        lines += class_table(cls, role, cli_fields)
        if name == "GPT2Config":
            lines += preset_tables()
        if name == "EnvParams":
            lines += env_extras()
    lines += [
        "## Traced hyperparameters",
        "",
        "Not options: records of traced arrays built from the configs above, so that a study can `jax.vmap` whole "
        "runs over them.",
        "",
    ]
    for module, name, role in TRACED:
        cls = getattr(importlib.import_module(module), name)
        table = class_table(cls, role, {}, traced=True)
        table[0] = "### " + name
        lines += table
    # every field listed by the CLI must be a field of a documented class
    documented = {n for _, n, _ in sections}
    stray = sorted(set(cli_fields) - documented)
    if stray:
        raise RuntimeError(f"the CLI exposes config classes that are not documented: {stray}")
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/config.md from the config dataclasses.")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if docs/config.md differs from what would be written"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            print(
                f"{args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out} is stale: "
                "run `python scripts/config_reference.py`",
                file=sys.stderr,
            )
            return 1
        print(f"{args.out.name} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
