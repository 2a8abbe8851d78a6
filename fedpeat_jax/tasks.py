"""The federated downstream task: Folio-spelling Shakespeare, one client per (play, role).

The foundation model is pretrained on modern spelling; the federated clients tune it on the
First Folio's original spelling, a natural domain shift. Whole held-out plays measure plug-in
perplexity. The server's own data (used when it takes part) is either the devices' own domain
(`server_domain="target"`: the roles too small to be clients, or a sample of the clients' text)
or public text of another domain (`"modern"`: the modern-spelling text of the training plays,
which the MEC environment's calibration and live mode give the server). A folder of the user's
own text files works the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np

from fedpeat_jax import data as data_lib
from fedpeat_jax.fed.simulation import FedData

PARTITIONS = ("natural", "iid", "dirichlet")
SERVER_DOMAINS = ("modern", "target")  # the server's own data: public modern-spelling text, or the devices' domain


@dataclass(frozen=True)
class TaskConfig:
    """Which text the clients hold and how it is cut into token windows."""

    corpus: str = "shakespeare"  # "shakespeare" or a folder of .txt files
    spelling: str = "folio"  # Shakespeare only: "folio" (downstream default) or "modern"
    partition: str = "natural"
    n_clients: int = 100  # iid / dirichlet only
    dirichlet_alpha: float = 0.5
    seq_len: int = 64
    min_speeches: int = 8
    test_fraction: float = 0.2
    max_examples: Optional[int] = 32  # windows kept per client (bounds the padded client axis)
    max_clients: Optional[int] = None  # keep only the largest clients
    max_eval_windows: Optional[int] = 256
    server_domain: str = "target"  # one of SERVER_DOMAINS (the MEC environment's calibration and live mode use "modern")
    server_windows: Optional[int] = None  # windows of server data kept (None: max_eval_windows)
    seed: int = 0

    def __post_init__(self):
        if self.partition not in PARTITIONS:
            raise ValueError(f"TaskConfig.partition must be one of {PARTITIONS}, got {self.partition!r}")
        if self.server_domain not in SERVER_DOMAINS:
            raise ValueError(f"TaskConfig.server_domain must be one of {SERVER_DOMAINS}, got {self.server_domain!r}")
        if self.spelling not in ("folio", "modern"):
            raise ValueError(f"TaskConfig.spelling must be 'folio' or 'modern', got {self.spelling!r}")
        for name in ("n_clients", "seq_len", "min_speeches"):
            if getattr(self, name) < 1:
                raise ValueError(f"TaskConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"TaskConfig.seq_len must be >= 2, got {self.seq_len}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"TaskConfig.test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.dirichlet_alpha <= 0:
            raise ValueError(f"TaskConfig.dirichlet_alpha must be > 0, got {self.dirichlet_alpha}")
        for name in ("max_examples", "max_clients", "max_eval_windows", "server_windows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"TaskConfig.{name} must be None or >= 1, got {value}")

    def replace(self, **changes) -> "TaskConfig":
        return dataclasses.replace(self, **changes)


class Task(NamedTuple):
    train: FedData  # the clients' training windows
    names: tuple  # client names ("play/role")
    client_test: tuple  # (tokens, mask): every client's test split, pooled
    heldout: tuple  # (tokens, mask): the held-out plays (plug-in perplexity)
    server: tuple  # (tokens, mask): the server's own data
    n_tokens: int  # real training tokens over all clients


def _windows(texts, tokenizer, seq_len: int, cap: Optional[int], seed: int) -> tuple:
    tokens, mask = data_lib.eval_windows(texts, tokenizer, seq_len)
    if cap is not None and len(tokens) > cap:
        keep = np.sort(np.random.default_rng(seed).permutation(len(tokens))[:cap])
        tokens, mask = tokens[keep], mask[keep]
    return tokens, mask.astype(np.float32)


def _load_corpus(cfg: TaskConfig, cache_dir=None):
    if cfg.corpus == "shakespeare":
        return data_lib.load_shakespeare(cfg.spelling, cache_dir=cache_dir)
    return data_lib.load_text_folder(cfg.corpus)


def _modern_server_texts(cache_dir=None) -> list:
    """Public text of another domain for the server: the modern-spelling speeches of the training
    plays (the foundation model's own pretraining text; the held-out plays stay out)."""
    return data_lib.pretraining_texts(data_lib.load_shakespeare("modern", cache_dir=cache_dir))


def build_task(cfg: TaskConfig, tokenizer, cache_dir=None) -> Task:
    corpus = _load_corpus(cfg, cache_dir)
    train_corpus, held_corpus = data_lib.split_heldout(corpus)
    if cfg.partition == "natural":
        clients = data_lib.natural_clients(corpus, min_speeches=cfg.min_speeches)
        big = set(clients.names)
        server_texts = [t for (play, role), texts in train_corpus.clients().items() if f"{play}/{role}" not in big for t in texts]
    else:
        speeches = [s for s in train_corpus.speeches]
        texts = [s.text for s in speeches]
        if cfg.partition == "iid":
            clients = data_lib.iid_clients(texts, cfg.n_clients, seed=cfg.seed)
        else:
            labels = [s.play for s in speeches]
            clients = data_lib.dirichlet_clients(texts, labels, cfg.n_clients, cfg.dirichlet_alpha, seed=cfg.seed)
        server_texts = []
    if cfg.max_clients is not None and len(clients) > cfg.max_clients:
        order = np.argsort([-n for n in clients.sizes], kind="stable")[: cfg.max_clients]
        clients = data_lib.TextClients(tuple(clients.names[i] for i in order), tuple(clients.examples[i] for i in order))
    train, test = data_lib.train_test_split(clients, cfg.test_fraction, seed=cfg.seed)
    client_data = data_lib.tokenize_clients(train, tokenizer, cfg.seq_len, max_examples=cfg.max_examples)
    fed_data = FedData.from_arrays(client_data.tokens, client_data.mask, client_data.counts)
    test_texts = [t for ex in test.examples for t in ex]
    held_texts = [s.text for s in held_corpus.speeches] or test_texts  # a user's corpus may have no held-out plays
    if cfg.server_domain == "modern":
        server_texts = _modern_server_texts(cache_dir)
    elif not server_texts:  # no natural leftovers: the server holds a sample of the clients' text
        server_texts = [t for ex in train.examples[:: max(1, len(train) // 20)] for t in ex]
    return Task(
        train=fed_data,
        names=client_data.names,
        client_test=_windows(test_texts, tokenizer, cfg.seq_len, cfg.max_eval_windows, cfg.seed),
        heldout=_windows(held_texts, tokenizer, cfg.seq_len, cfg.max_eval_windows, cfg.seed),
        server=_windows(server_texts, tokenizer, cfg.seq_len, cfg.server_windows or cfg.max_eval_windows, cfg.seed),
        n_tokens=int(np.asarray(client_data.mask).sum()),
    )


def device_population(task: Task, n: int, seed: int = 0) -> Task:
    """The task restricted to ``n`` of its clients (a seeded choice, in client order): the devices
    of a MEC environment. ``fedpeat calibrate`` measures data fractions relative to this
    population and the live environment trains exactly these clients, so both describe the same
    devices. Held-out, test and server data are unchanged."""
    total = int(task.train.tokens.shape[0])
    if not 1 <= n <= total:
        raise ValueError(f"a device population of {n} clients needs 1 <= n <= the task's {total} clients")
    ids = np.sort(np.random.default_rng(seed).permutation(total)[:n])
    train = FedData.from_arrays(*(np.asarray(x)[ids] for x in (task.train.tokens, task.train.mask, task.train.counts)))
    return task._replace(train=train, names=tuple(task.names[i] for i in ids), n_tokens=int(np.asarray(train.mask).sum()))

