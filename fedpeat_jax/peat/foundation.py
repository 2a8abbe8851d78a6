"""The project's own foundation model: a small GPT-2 pretrained on the modern-spelling plays.

    fm = load_foundation()                 # the model shipped with the package (no pretraining)
    fm.params, fm.config, fm.tokenizer, fm.path, fm.info["heldout_ppl"]
    fm = load_foundation(shipped=False)    # pretrained here (cached after the first call)

The shipped model (`fedpeat_jax/assets/foundation/default/`) is the "default" preset exactly as
`fedpeat pretrain` makes it, its weights rounded to float16 (`scripts/ship_foundation.py` writes
it); its foundation.json records the pretraining settings and record, the held-out perplexity
measured with the rounded weights and the sha256 of every file. Every foundation directory with
recorded checksums is verified before it is loaded: a missing, truncated or altered file raises
`FoundationFilesError` (a ValueError: the CLI prints its one line and exits 2).

Pretraining (`pretrain`): train a byte-level BPE on the training plays (held-out plays excluded),
cut the eos-separated speech stream into windows, train with `peat.train.fit` (progress bar,
TensorBoard + metrics.jsonl, an orbax checkpoint per chunk so an interrupted run resumes), measure
held-out perplexity, and export Hugging Face format (config.json + model.safetensors + tokenizer
files) to `<cache>/foundation/<preset>-<fingerprint>`. The fingerprint hashes everything that
changes the result (the model fields in WEIGHT_FIELDS, pretraining settings, held-out plays,
corpus checksum), so a changed setting never silently reuses a stale model. `foundation.json` is
written last and marks the directory complete; a lock file keeps two processes from pretraining
the same model at once.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional

import jax

from fedpeat_jax import data as data_lib
from fedpeat_jax.config import Config, GPT2Config
from fedpeat_jax.data.source import TextConfig
from fedpeat_jax.io.checkpoint import CheckpointManager
from fedpeat_jax.io.files import file_lock, file_sha256, write_json_atomic
from fedpeat_jax.io.fingerprint import fingerprint as fingerprint_of
from fedpeat_jax.io.fingerprint import tree_digest
from fedpeat_jax.io.logging import RunLogger
from fedpeat_jax.io.machine import machine_info
from fedpeat_jax.model import gpt2, hf
from fedpeat_jax.peat.train import TrainConfig, evaluate_perplexity, fit, lm_objective

FORMAT_VERSION = 1  # bump when pretraining code changes its result for the same settings
INFO_FILE = "foundation.json"
SHIPPED_ROOT = Path(__file__).resolve().parents[1] / "assets" / "foundation"  # one folder per preset
SHIPPED_DTYPE = "float16"  # 10 mantissa bits: the held-out perplexity moves by well under 0.1%
SUBSET_WINDOWS = 16  # the held-out windows whose perplexity a fast test re-measures


class FoundationFilesError(ValueError):
    """A foundation model's file is missing or differs from the sha256 its foundation.json records."""


@dataclass(frozen=True)
class PretrainConfig(Config):
    """How a foundation model is pretrained (the model's shape is its GPT2Config preset)."""

    seq_len: int = 256  # the default model's n_positions: every position embedding gets trained
    steps: int = 300
    """Optimizer steps."""
    batch: int = 8
    """Windows per step."""
    lr: float = 2e-3
    """Peak learning rate (AdamW)."""
    warmup: int = 30
    """Linear warm-up steps, then cosine decay."""
    final_lr_ratio: float = 0.1
    """Final learning rate / peak."""
    weight_decay: float = 0.01
    """AdamW weight decay (kernels and embeddings only)."""
    dropout: bool = False  # well under two epochs: dropout would only slow learning
    # LayerDrop (Fan et al., 2019) on the middle blocks [l, n_layer - r), (l, r) = layerdrop_span:
    # each is skipped with this probability at every step. Off by default: at 0.5 the default
    # model learned to do without its middle blocks, and the offsite pattern did not appear
    layerdrop: float = 0.0
    layerdrop_span: tuple[int, int] = (2, 2)
    """(l, r): LayerDrop may skip blocks [l, n_layer - r), the offsite-tuning middle."""
    heldout_plays: tuple[str, ...] = data_lib.DEFAULT_HELDOUT_PLAYS
    """Plays excluded from pretraining and from the federated clients (held-out evaluation)."""
    # the text pretrained on: modern-spelling plays by default, or your own (held out: heldout_plays
    # for Shakespeare, the TextConfig's held-out documents for your text); the tokenizer is trained on it too
    text: TextConfig = TextConfig(spelling="modern")
    eval_batch: int = 16
    """Windows per batch of the held-out evaluation."""
    chunk: int = 20
    """Steps per jitted call (= checkpoint interval)."""
    seed: int = 0
    """Seed of initialization and batch sampling."""

    def validate(self) -> None:
        if not 0.0 <= self.layerdrop < 1.0:
            raise ValueError(f"PretrainConfig.layerdrop must be in [0, 1), got {self.layerdrop}")
        if len(self.layerdrop_span) != 2 or min(self.layerdrop_span) < 0:
            raise ValueError(
                f"PretrainConfig.layerdrop_span must be two block counts (l, r) >= 0, got {self.layerdrop_span}"
            )
        if self.seq_len < 2:
            raise ValueError(f"PretrainConfig.seq_len must be >= 2, got {self.seq_len}")
        self.train_config()  # validates steps, batch, lr, warmup...

    def train_config(self) -> TrainConfig:
        return TrainConfig.of(
            "PretrainConfig",
            steps=self.steps,
            batch=self.batch,
            lr=self.lr,
            warmup=self.warmup,
            final_lr_ratio=self.final_lr_ratio,
            weight_decay=self.weight_decay,
            chunk=self.chunk,
            seed=self.seed,
        )

    def layerdrop_blocks(self, n_layer: int) -> tuple:
        """The blocks LayerDrop may skip: the middle [l, n_layer - r) of the offsite-tuning split."""
        l, r = self.layerdrop_span
        return tuple(range(l, n_layer - r))


# Pretraining settings per GPT2Config preset. "default" sees 0.61 M tokens (0.56 epoch of the
# 1.09 M-token training stream). Measured on the 2-core CPU: ~0.7 s/step with the machine nearly
# idle (about 4 minutes for 300 steps), 6.1 s/step under a load average of 7 (31 minutes); the
# time of each pretraining is recorded in its foundation.json. "base" is for accelerators.
PRETRAIN_PRESETS = {
    "tiny": PretrainConfig(seq_len=64, steps=60, batch=8, lr=3e-3, warmup=6, chunk=20),
    "default": PretrainConfig(),
    "base": PretrainConfig(seq_len=256, steps=8000, batch=16, lr=1e-3, warmup=400, chunk=200, eval_batch=32),
}


class Foundation(NamedTuple):
    params: Any
    config: GPT2Config
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    path: Path
    info: dict  # the contents of foundation.json (held-out perplexity, timings, settings)
    work_dir: (
        Path  # where files derived from it are cached (distilled emulators): `path`, or the cache for the shipped model
    )

    @property
    def shipped(self) -> bool:
        """Whether this is the model shipped with the package."""
        return "shipped" in self.info


# The GPT2Config fields that decide the pretrained weights: the shape, plus initialisation and
# compute precision. A whitelist, so execution-only fields (rematerialisation, attention kernel)
# never change a fingerprint. Dropout rates count only when pretraining uses dropout.
WEIGHT_FIELDS = (
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "d_mlp",
    "layer_norm_epsilon",
    "initializer_range",
    "dtype",
)
DROPOUT_FIELDS = ("embd_pdrop", "attn_pdrop", "resid_pdrop")


def fingerprinted_settings(pretrain: PretrainConfig) -> dict:
    """The pretraining settings that enter the fingerprint: fields added after the first release are
    left out at their defaults, so earlier caches (and the shipped model) keep their fingerprints."""
    settings = dataclasses.asdict(pretrain)
    if settings["layerdrop"] == 0.0:
        del settings["layerdrop"], settings["layerdrop_span"]
    if pretrain.text == PretrainConfig.text:
        del settings["text"]
    return settings


def fingerprint(model: GPT2Config, pretrain: PretrainConfig) -> str:
    """Short hash of everything that determines the pretrained weights (model fields in WEIGHT_FIELDS,
    pretraining settings, held-out plays, corpus checksum)."""
    settings = fingerprinted_settings(pretrain)
    fields = WEIGHT_FIELDS + (DROPOUT_FIELDS if pretrain.dropout else ())
    return fingerprint_of(
        {
            "format": FORMAT_VERSION,
            "model": {name: getattr(model, name) for name in fields},
            "pretrain": settings,
            "corpus": data_lib.corpus_digest(pretrain.text),
        },
        length=12,
    )


def resolve_settings(
    preset: str, model: Optional[GPT2Config] = None, pretrain_config: Optional[PretrainConfig] = None
) -> tuple:
    """(model config, pretraining config) of a preset, either overridable."""
    if model is None:
        model = GPT2Config.preset(preset)
    pretrain = pretrain_config
    if pretrain is None:
        if preset not in PRETRAIN_PRESETS:
            raise ValueError(
                f"no pretraining settings for preset {preset!r} (have {sorted(PRETRAIN_PRESETS)}); pass pretrain_config=PretrainConfig(...), "
                "or load real GPT-2 weights with fedpeat_jax.model.hf.load_pretrained"
            )
        pretrain = PRETRAIN_PRESETS[preset]
    if pretrain.seq_len > model.n_positions:
        raise ValueError(f"pretraining seq_len {pretrain.seq_len} exceeds the model's n_positions {model.n_positions}")
    return model, pretrain


def foundation_dir(
    preset: str = "default",
    *,
    cache_dir=None,
    model: Optional[GPT2Config] = None,
    pretrain_config: Optional[PretrainConfig] = None,
) -> Path:
    """`<cache>/foundation/<preset>-<fingerprint>` (cache: `cache_dir`, $FEDPEAT_CACHE, ~/.cache/fedpeat_jax)."""
    model, pcfg = resolve_settings(preset, model, pretrain_config)
    return data_lib.resolve_cache_dir(cache_dir) / "foundation" / f"{preset}-{fingerprint(model, pcfg)}"


def pretraining_texts(
    heldout_plays=data_lib.DEFAULT_HELDOUT_PLAYS, *, cache_dir=None, text: Optional[TextConfig] = None
) -> tuple:
    """(training examples, held-out examples, held-out document names) of `text` (default: the
    modern-spelling plays, the "general corpus" that emulator distillation uses too);
    `heldout_plays` are Shakespeare's held-out plays, a user's text holds out its TextConfig's documents."""
    text = PretrainConfig.text if text is None else text
    return data_lib.training_and_heldout_texts(
        text, cache_dir, heldout_docs=heldout_plays if text.is_shakespeare else None
    )


def pretraining_data(
    model: GPT2Config, pretrain_config: PretrainConfig, tokenizer_dir: Path, *, cache_dir=None
) -> tuple:
    """(tokenizer, training windows int32[N, T], held-out (tokens, mask) or None, held-out document
    names) of the pretraining text.

    The tokenizer is trained once and saved in `tokenizer_dir`, so a resumed run sees exactly
    the token ids of the interrupted one.
    """
    train_texts, held_texts, held_docs = pretraining_texts(
        pretrain_config.heldout_plays, cache_dir=cache_dir, text=pretrain_config.text
    )
    if (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer = data_lib.load_tokenizer(tokenizer_dir)
    else:
        tokenizer = data_lib.train_bpe_tokenizer(train_texts, model.vocab_size, save_dir=tokenizer_dir)
    if len(tokenizer) > model.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size {model.vocab_size}")
    windows = data_lib.pretraining_windows(train_texts, tokenizer, pretrain_config.seq_len)
    if len(windows) == 0:
        raise ValueError(
            f"PretrainConfig.seq_len: the pretraining text of {pretrain_config.text.describe()} gives no full window of "
            f"{pretrain_config.seq_len} tokens; lower it or give more text"
        )
    heldout = (
        data_lib.eval_windows(held_texts, tokenizer, pretrain_config.seq_len) if held_texts else None
    )  # None: no held-out text
    return tokenizer, windows, heldout, held_docs


def pretrain(
    preset: str = "default",
    *,
    out_dir=None,
    cache_dir=None,
    model: Optional[GPT2Config] = None,
    pretrain_config: Optional[PretrainConfig] = None,
    show_progress: bool = True,
    overwrite: bool = False,
) -> Foundation:
    """Pretrain a foundation model and export it (default: into its cache directory).

    Work files live in `<out_dir>.run/`: the tokenizer, TensorBoard logs (kept) and checkpoints
    (deleted once the export is complete). Re-running after an interruption resumes.
    """
    model, pcfg = resolve_settings(preset, model, pretrain_config)
    out = (
        Path(out_dir)
        if out_dir is not None
        else foundation_dir(preset, cache_dir=cache_dir, model=model, pretrain_config=pcfg)
    )
    if (out / INFO_FILE).is_file() and not overwrite:
        raise FileExistsError(f"a foundation model already exists in {out}; use load_foundation, or overwrite=True")
    run_dir = out.with_name(out.name + ".run")
    tokenizer, windows, heldout, held_docs = pretraining_data(model, pcfg, run_dir / "tokenizer", cache_dir=cache_dir)

    ckpt = CheckpointManager(run_dir / "ckpt", max_to_keep=1)
    resume = ckpt.latest_step()
    train_model = model if pcfg.dropout else model.replace(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    params = gpt2.init(jax.random.PRNGKey(pcfg.seed), model)
    with RunLogger(run_dir / "logs", resume_step=resume) as logger:
        result = fit(
            lm_objective(
                train_model,
                dropout=pcfg.dropout,
                layerdrop=pcfg.layerdrop,
                layerdrop_blocks=pcfg.layerdrop_blocks(model.n_layer),
            ),
            params,
            None,
            {"tokens": windows},
            pcfg.train_config(),
            logger=logger,
            checkpoints=ckpt,
            desc=f"pretrain {preset}",
            log_prefix="pretrain/",
            show_progress=show_progress,
        )
        held = {"ppl": None, "nll": None, "tokens": 0}  # no held-out text: no perplexity
        if heldout is not None:
            held = evaluate_perplexity(result.params, *heldout, model, batch=pcfg.eval_batch)
            logger.scalars(pcfg.steps, {"heldout_ppl": held["ppl"], "heldout_nll": held["nll"]}, prefix="pretrain/")
    ckpt.close()

    tokens_per_step = pcfg.batch * pcfg.seq_len
    info = {
        "preset": preset,
        "fingerprint": fingerprint(model, pcfg),
        "model": dataclasses.asdict(model),
        "pretrain": dataclasses.asdict(pcfg),
        "param_count": model.param_count(),
        "heldout_plays": list(held_docs),  # held-out documents of a user's text
        "heldout_ppl": held["ppl"],
        "heldout_nll": held["nll"],
        "heldout_tokens": held["tokens"],
        "train_windows": int(len(windows)),
        "train_tokens_seen": pcfg.steps * tokens_per_step,
        "epochs": pcfg.steps * pcfg.batch / len(windows),
        "final_train_loss": result.history[-1]["loss"] if result.history else None,  # None: resumed a finished run
        "train_seconds": result.seconds,  # this call only (a resumed run counts its last part)
        "resumed_from_step": result.resumed_from,
        "train_tokens_per_s": result.steps_per_s * tokens_per_step,
        "machine": machine_info(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    hf.save_pretrained(result.params, model, out, tokenizer=tokenizer, overwrite=True)
    info["sha256"] = file_checksums(out)
    write_json_atomic(out / INFO_FILE, info)  # last: marks the directory complete
    shutil.rmtree(run_dir / "ckpt", ignore_errors=True)
    return Foundation(result.params, model, tokenizer, out, info, out)


def load_foundation(
    preset: str = "default",
    *,
    cache_dir=None,
    model: Optional[GPT2Config] = None,
    pretrain_config: Optional[PretrainConfig] = None,
    shipped: bool = True,
    allow_pretrain: bool = True,
    show_progress: bool = True,
) -> Foundation:
    """The foundation model of `preset`: the one shipped with the package when it has these
    settings (and `shipped`), else the cached one, pretraining it first if it is not cached yet."""
    model, pcfg = resolve_settings(preset, model, pretrain_config)
    fp = fingerprint(model, pcfg)
    if shipped and shipped_fingerprint(preset) == fp:
        work_dir = data_lib.resolve_cache_dir(cache_dir) / "foundation" / f"shipped-{preset}-{fp}"
        return open_foundation(SHIPPED_ROOT / preset, work_dir=work_dir)
    path = foundation_dir(preset, cache_dir=cache_dir, model=model, pretrain_config=pcfg)
    with file_lock(path.with_name(path.name + ".lock")):
        if not (path / INFO_FILE).is_file():
            if not allow_pretrain:
                raise FileNotFoundError(
                    f"no foundation model for preset {preset!r} in {path}; run `fedpeat pretrain --preset {preset}` "
                    "(or call load_foundation with allow_pretrain=True)"
                )
            return pretrain(
                preset,
                out_dir=path,
                cache_dir=cache_dir,
                model=model,
                pretrain_config=pcfg,
                show_progress=show_progress,
                overwrite=True,
            )
    return open_foundation(path)


def open_foundation(path, *, work_dir=None) -> Foundation:
    """A foundation model from an exported directory (ours, written by `pretrain` or `ship`),
    its files checked against the sha256 recorded in its foundation.json first."""
    path = Path(path)
    if not (path / INFO_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete foundation model directory (no {INFO_FILE})")
    info = read_info(path)
    verify_files(path, info.get("sha256", {}))
    params, config = hf.load_pretrained(path)
    return Foundation(
        params, config, hf.load_tokenizer(path), path, info, Path(work_dir) if work_dir is not None else path
    )


# --------------------------------------------------------------------------------------------
# Checksums and the shipped model
# --------------------------------------------------------------------------------------------
def file_checksums(path: Path) -> dict:
    """{file name: sha256} of every file of a foundation directory but foundation.json itself."""
    return {f.name: file_sha256(f) for f in sorted(Path(path).iterdir()) if f.is_file() and f.name != INFO_FILE}


def verify_files(path: Path, checksums: dict) -> None:
    """Raise FoundationFilesError, naming the file, unless every file has its recorded sha256."""
    for name, expected in sorted(checksums.items()):
        file = Path(path) / name
        if not file.is_file():
            raise FoundationFilesError(
                f"foundation model file {file} is missing: restore it (reinstall the package for the shipped model)"
            )
        got = file_sha256(file)
        if got != expected:
            raise FoundationFilesError(
                f"foundation model file {file} is corrupt or truncated ({file.stat().st_size:,} bytes, sha256 {got[:16]}... "
                f"where {INFO_FILE} records {expected[:16]}...): restore it (reinstall the package for the shipped model)"
            )


def read_info(path: Path) -> dict:
    """The foundation.json of a foundation directory (FoundationFilesError if it is damaged)."""
    info_file = Path(path) / INFO_FILE
    try:
        info = json.loads(info_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FoundationFilesError(f"foundation model file {info_file} is damaged ({err}): restore it") from None
    if not isinstance(info, dict) or "fingerprint" not in info:
        raise FoundationFilesError(f"foundation model file {info_file} is damaged (no fingerprint): restore it")
    return info


def shipped_fingerprint(preset: str) -> Optional[str]:
    """The fingerprint of the model shipped for `preset`, or None when none ships."""
    path = SHIPPED_ROOT / preset
    return read_info(path)["fingerprint"] if (path / INFO_FILE).is_file() else None


def heldout_perplexity(fm: Foundation, *, windows: int = 0, cache_dir=None) -> dict:
    """`evaluate_perplexity` of `fm` on its pretraining text's held-out documents, in its pretraining's
    windows; `windows` > 0 keeps only the first that many (a fast, fixed subset)."""
    pcfg = fm.info["pretrain"]
    text = TextConfig(**pcfg["text"]) if "text" in pcfg else None  # recorded since a user's text could be pretrained on
    _, held_texts, _ = pretraining_texts(tuple(pcfg["heldout_plays"]), cache_dir=cache_dir, text=text)
    tokens, mask = data_lib.eval_windows(held_texts, fm.tokenizer, pcfg["seq_len"])
    if windows:
        tokens, mask = tokens[:windows], mask[:windows]
    return evaluate_perplexity(fm.params, tokens, mask, fm.config, batch=pcfg["eval_batch"])


def ship(fm: Foundation, dest, *, command: str, cache_dir=None) -> Foundation:
    """Write `fm` as a shipped model: float16 weights, tokenizer, and a foundation.json with the
    pretraining record, the held-out perplexity of the ROUNDED weights (all windows and the first
    SUBSET_WINDOWS), the command, the machine and every file's sha256."""
    dest = Path(dest)
    hf.save_pretrained(fm.params, fm.config, dest, tokenizer=fm.tokenizer, overwrite=True, weights_dtype=SHIPPED_DTYPE)
    params, config = hf.load_pretrained(dest)
    rounded = fm._replace(params=params, config=config, path=dest, work_dir=dest)
    full = heldout_perplexity(rounded, cache_dir=cache_dir)
    subset = heldout_perplexity(rounded, windows=SUBSET_WINDOWS, cache_dir=cache_dir)
    info = {
        **{k: v for k, v in fm.info.items() if k != "sha256"},
        "heldout_ppl": full["ppl"],
        "heldout_nll": full["nll"],
        "heldout_tokens": full["tokens"],
        "heldout_subset": {
            "windows": SUBSET_WINDOWS,
            "ppl": subset["ppl"],
            "nll": subset["nll"],
            "tokens": subset["tokens"],
        },
        "shipped": {
            "command": command,
            "weights_dtype": SHIPPED_DTYPE,
            "float32_heldout_ppl": fm.info["heldout_ppl"],
            "params_sha256": tree_digest(params),
            "machine": machine_info(),  # of this export and its evaluation ("machine" is the pretraining's)
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "sha256": file_checksums(dest),
    }
    write_json_atomic(dest / INFO_FILE, info)
    return rounded._replace(info=info)


__all__ = [
    "PretrainConfig",
    "PRETRAIN_PRESETS",
    "Foundation",
    "fingerprint",
    "resolve_settings",
    "foundation_dir",
    "pretraining_texts",
    "pretraining_data",
    "pretrain",
    "load_foundation",
    "open_foundation",
    "FoundationFilesError",
    "SHIPPED_ROOT",
    "file_checksums",
    "verify_files",
    "read_info",
    "shipped_fingerprint",
    "heldout_perplexity",
    "ship",
]
