"""The federated round's config (`FedConfig`) and the offsite-tuning adapter split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fedpeat_jax.config.base import Config, require
from fedpeat_jax.config.model import GPT2Config

CLIENT_OPTIMIZERS = ("sgd", "adam")
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi")
ALGORITHMS = ("fedavg", "fedprox", "scaffold", "local")
TRAINABLES = ("adapter", "all_blocks", "model")
AGGREGATIONS = ("mean", "median", "trimmed_mean", "norm_bound")
LORA_AGGREGATIONS = ("mean", "exact")


@dataclass(frozen=True)
class FedConfig(Config):
    """One federated tuning run: sampling, local training, aggregation, privacy, emulators.

    What devices train (`trainable`): "adapter" (FedPEAT: the PEFT module in the adapter blocks,
    tuned on an emulator), "all_blocks" (the PEFT module in every block, tuned on the full model,
    e.g. FedIT's LoRA) or "model" (every weight: full fine-tuning on the full model). The last two
    need the device to hold the whole model: `emulator_levels` is then the whole middle.
    `algorithm="local"` is local-only tuning: every client keeps and continues its own tree and
    nothing is aggregated.

    Emulators: every client trains on an `l-k-r` emulator with k from `emulator_levels`; which
    level each client holds is given per client (`ClientData`-side or by the controller). Each
    round has `level_slots[j]` client slots on level j (default: all `clients_per_round` slots on
    the first level), so a round pays for each client's own emulator, never the largest on all.

    Memory: a round trains its clients `client_chunk` at a time (vmapped inside a chunk, a scan
    over chunks, aggregation streamed through the scan), so its memory is flat in
    `clients_per_round`. None picks the chunk: at most `fed.simulation.default_client_chunk` (8 on
    a CPU, 32 on an accelerator), fewer when the
    compiled round would not fit in `memory_budget_gb` (None: most of the device's memory).
    """

    clients_per_round: int = 8
    """Clients sampled per round (distinct; split over emulator levels by level_slots)."""
    rounds: int = 20
    """Total rounds of `driver.train` (and `fedpeat tune`)."""
    local_steps: int = 4
    """Optimizer steps each client runs per round (one `lax.scan`)."""
    local_batch: int = 2
    """Windows per local step."""
    client_optimizer: str = "adam"
    """Local optimizer (a fresh optimizer state every round)."""
    client_lr: float = 1e-3
    """Local learning rate (traced: `Hyper.client_lr`)."""
    algorithm: str = "fedavg"
    """'fedprox' adds (prox_mu / 2) ||w - w_global||^2 to the local loss; 'scaffold' needs client_optimizer 'sgd'."""
    prox_mu: float = 0.01
    """FedProx proximal weight (traced: `Hyper.prox_mu`)."""
    server_optimizer: str = "fedavg"
    """FedOpt server optimizer on the pseudo-gradient -mean(delta) (`fed.server_opt.server_optimizer`)."""
    server_lr: float = 1.0
    """Server learning rate; 1.0 with 'fedavg' is plain FedAvg (traced: `Hyper.server_lr`)."""
    aggregation: str = "mean"
    """Robust aggregation rule of the client deltas."""
    trim_fraction: float = 0.1
    """Fraction trimmed at each end by 'trimmed_mean'."""
    norm_bound: float = 1.0
    """L2 bound on each client delta for 'norm_bound'."""
    lora_aggregation: str = "mean"
    """'exact' (FLoRA) merges the exact mean of the LoRA products into the adapter kernels; LoRA only, FedAvg mean, no
    DP, no SCAFFOLD."""
    log_lora_gap: bool = True  # costs a dense product per client and target each round
    dp_clip: Optional[float] = None  # client-level DP-FedAvg when set
    dp_noise: float = 0.0  # noise multiplier sigma (std = sigma * dp_clip on the sum)
    dp_delta: float = 1e-6
    """Target delta of the reported epsilon (`privacy.dp_epsilon`)."""
    secure_aggregation: bool = False
    """Simulate pairwise-mask secure aggregation of the weighted deltas (mean aggregation only)."""
    server_participation: bool = False
    """The server tunes the same PEFT state on its own data with the full model and joins the aggregate as one more
    client."""
    server_batch: int = 2
    """The server's local batch (windows per step)."""
    adapter_l: int = 2
    """Bottom adapter blocks l."""
    adapter_r: int = 2
    """Top adapter blocks r."""
    emulator_levels: tuple[int, ...] = (2,)  # k values (middle blocks kept) devices may hold
    level_slots: Optional[tuple[int, ...]] = None
    """Client slots per emulator level in each round; None puts all clients_per_round slots on the first level."""
    trainable: str = "adapter"
    """What devices train: 'adapter' (FedPEAT: the PEFT module in the adapter blocks, on emulators), 'all_blocks' (the PEFT
    module in every block, on the full model) or 'model' (every weight: full fine-tuning); the last two need emulator_levels
    to be the whole middle."""
    client_chunk: Optional[int] = None
    """Clients trained at once (vmapped) inside a round; a scan runs the chunks and streams the aggregate, so memory is flat
    in clients_per_round. None: the default chunk, halved until the compiled round fits memory_budget_gb."""
    memory_budget_gb: Optional[float] = None
    """Memory a compiled round may use; None: 90% of an accelerator's memory, or half of the host's available memory."""
    rounds_per_chunk: int = 5
    """Rounds per jitted `lax.scan` call; the host evaluates, logs and checkpoints between chunks."""
    eval_batch: int = 16
    """Windows per batch of the held-out evaluation."""
    seed: int = 0
    """Run seed: every draw derives from (seed, round), which makes resume exact."""

    @property
    def slots(self) -> tuple:
        """Client slots per emulator level in each round."""
        if self.level_slots is not None:
            return self.level_slots
        return (self.clients_per_round,) + (0,) * (len(self.emulator_levels) - 1)

    def validate(self, n_clients: Optional[int] = None, model: Optional[GPT2Config] = None) -> None:
        """Check the config alone, and against the data (`n_clients`) and `model` when given."""
        for name in ("clients_per_round", "rounds", "local_steps", "local_batch", "rounds_per_chunk", "eval_batch"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"FedConfig.{name} must be an integer >= 1, got {value!r}")
        require(
            self.client_optimizer in CLIENT_OPTIMIZERS,
            f"FedConfig.client_optimizer must be one of {CLIENT_OPTIMIZERS}, got {self.client_optimizer!r}",
        )
        require(
            self.server_optimizer in SERVER_OPTIMIZERS,
            f"FedConfig.server_optimizer must be one of {SERVER_OPTIMIZERS}, got {self.server_optimizer!r}",
        )
        require(
            self.algorithm in ALGORITHMS, f"FedConfig.algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}"
        )
        require(
            self.trainable in TRAINABLES, f"FedConfig.trainable must be one of {TRAINABLES}, got {self.trainable!r}"
        )
        require(
            self.client_chunk is None or (isinstance(self.client_chunk, int) and self.client_chunk >= 1),
            f"FedConfig.client_chunk must be None or an integer >= 1, got {self.client_chunk!r}",
        )
        require(
            self.memory_budget_gb is None or self.memory_budget_gb > 0,
            f"FedConfig.memory_budget_gb must be None or > 0, got {self.memory_budget_gb!r}",
        )
        require(
            self.aggregation in AGGREGATIONS,
            f"FedConfig.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}",
        )
        require(
            self.lora_aggregation in LORA_AGGREGATIONS,
            f"FedConfig.lora_aggregation must be one of {LORA_AGGREGATIONS}, got {self.lora_aggregation!r}",
        )
        require(self.client_lr > 0, f"FedConfig.client_lr must be > 0, got {self.client_lr}")
        require(self.server_lr > 0, f"FedConfig.server_lr must be > 0, got {self.server_lr}")
        require(self.prox_mu >= 0, f"FedConfig.prox_mu must be >= 0, got {self.prox_mu}")
        require(0 <= self.trim_fraction < 0.5, f"FedConfig.trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        require(self.norm_bound > 0, f"FedConfig.norm_bound must be > 0, got {self.norm_bound}")
        require(self.dp_clip is None or self.dp_clip > 0, f"FedConfig.dp_clip must be None or > 0, got {self.dp_clip}")
        require(self.dp_noise >= 0, f"FedConfig.dp_noise must be >= 0, got {self.dp_noise}")
        require(
            self.dp_noise == 0 or self.dp_clip is not None,
            "FedConfig.dp_noise needs dp_clip (noise is scaled by the clipping norm)",
        )
        require(0 < self.dp_delta < 1, f"FedConfig.dp_delta must be in (0, 1), got {self.dp_delta}")
        require(len(self.emulator_levels) >= 1, "FedConfig.emulator_levels must name at least one emulator size k")
        require(
            len(set(self.emulator_levels)) == len(self.emulator_levels),
            f"FedConfig.emulator_levels has duplicates: {self.emulator_levels}",
        )
        require(
            all(k >= 0 for k in self.emulator_levels),
            f"FedConfig.emulator_levels must be >= 0, got {self.emulator_levels}",
        )
        slots = self.slots
        require(
            len(slots) == len(self.emulator_levels),
            f"FedConfig.level_slots {slots} must have one entry per emulator level {self.emulator_levels}",
        )
        require(
            all(s >= 0 for s in slots) and sum(slots) == self.clients_per_round,
            f"FedConfig.level_slots {slots} must be >= 0 and sum to clients_per_round ({self.clients_per_round})",
        )
        self._check_combinations()
        if n_clients is not None:
            require(
                self.clients_per_round <= n_clients,
                f"FedConfig.clients_per_round ({self.clients_per_round}) is more than the {n_clients} clients that exist",
            )
        if model is not None:
            n_middle = model.n_layer - self.adapter_l - self.adapter_r
            require(
                self.adapter_l >= 0 and self.adapter_r >= 0 and n_middle >= 1,
                f"FedConfig adapter l={self.adapter_l}, r={self.adapter_r} leaves no middle in a {model.n_layer}-block model",
            )
            too_big = [k for k in self.emulator_levels if k > n_middle]
            require(
                not too_big, f"FedConfig.emulator_levels {too_big} larger than the model's middle ({n_middle} blocks)"
            )
            if self.trainable != "adapter":
                require(
                    self.emulator_levels == (n_middle,),
                    f"FedConfig.trainable={self.trainable!r} trains on the full model: set FedConfig.emulator_levels to the "
                    f"whole middle ({n_middle},), got {self.emulator_levels}",
                )

    def _check_combinations(self) -> None:
        """Options that do not combine, refused before anything is traced."""
        if self.lora_aggregation == "exact":
            require(
                self.trainable != "model",
                "FedConfig.lora_aggregation='exact' needs a LoRA module, not FedConfig.trainable='model'",
            )
            require(
                self.server_optimizer == "fedavg"
                and self.aggregation == "mean"
                and self.dp_clip is None
                and self.algorithm in ("fedavg", "fedprox"),
                "FedConfig.lora_aggregation='exact' (FLoRA) combines only with server_optimizer='fedavg', "
                "aggregation='mean', no DP, and algorithm 'fedavg' or 'fedprox'",
            )
        if self.algorithm == "scaffold":
            require(
                self.client_optimizer == "sgd",
                "FedConfig.algorithm='scaffold' assumes plain SGD: set FedConfig.client_optimizer='sgd'",
            )
            require(
                not self.server_participation,
                "FedConfig.algorithm='scaffold' keeps no control variate for the server: "
                "set FedConfig.server_participation=False",
            )
        if self.algorithm == "local":
            require(
                not (
                    self.server_participation
                    or self.secure_aggregation
                    or self.dp_clip is not None
                    or self.lora_aggregation == "exact"
                    or self.aggregation != "mean"
                    or self.server_optimizer != "fedavg"
                ),
                "FedConfig.algorithm='local' aggregates nothing: server_participation, secure_aggregation, dp_clip, "
                "lora_aggregation='exact', robust aggregation and server optimizers do not apply",
            )
        require(
            not (self.secure_aggregation and (self.dp_clip is not None or self.aggregation != "mean")),
            "FedConfig.secure_aggregation sums weighted uploads: it combines only with aggregation='mean' and no dp_clip",
        )


def adapter_layers(n_layer: int, l: int = 2, r: int = 2) -> tuple:
    """Offsite tuning's adapter: the bottom `l` and top `r` blocks of an `n_layer` model."""
    require(l >= 0 and r >= 0, f"adapter sizes must be >= 0, got l={l}, r={r}")
    require(l + r < n_layer, f"adapter l={l} + r={r} leaves no middle in a model with {n_layer} blocks")
    return tuple(range(l)) + tuple(range(n_layer - r, n_layer))
