"""The federated downstream task: which text the clients hold, and how it becomes token windows.

Default: the First Folio's spelling of the plays, one client per (play, role) (LEAF's clients).
The foundation model is pretrained on modern spelling, so tuning on the Folio is a natural domain
shift; whole held-out plays measure plug-in perplexity, and the roles too small to be clients
are the server's own data when it takes part (`server_domain="target"`).

Your own text (`TaskConfig.text`, a folder of text files or one file): one client per document
("natural"), or its examples (paragraphs or windows of words) dealt IID or by a Dirichlet over
documents; held-out documents measure plug-in perplexity, and documents too small to be clients
are the server's data.

The server's own data can instead be public text of another domain (`server_domain="modern"`:
the modern-spelling text of Shakespeare's training plays, the foundation model's own
pretraining text), as the MEC environment's calibration and live mode give it.

Two stages, so that every data check runs before a model is loaded or pretrained:

    plan = plan_task(cfg)                       # text level: corpus, held-out text, clients, server text
    task = tokenize_task(plan, cfg, tokenizer)  # token windows the simulator vmaps over
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np

from fedpeat_jax import data as data_lib
from fedpeat_jax.config import Config
from fedpeat_jax.data.source import TextConfig
from fedpeat_jax.fed.simulation import FedData

PARTITIONS = ("natural", "iid", "dirichlet")
SERVER_DOMAINS = ("modern", "target")  # the server's own data: public modern-spelling text, or the devices' domain


@dataclass(frozen=True)
class TaskConfig(Config):
    """Which text the clients hold, how it is partitioned and cut into token windows."""

    text: TextConfig = TextConfig()
    """The corpus (set by the `text` options of the command line)."""
    partition: str = "natural"
    """"natural" (one client per (play, role) of Shakespeare, one per document of your text), "iid", or "dirichlet" (label skew over plays or documents)."""
    n_clients: int = 100  # iid / dirichlet only
    dirichlet_alpha: float = 0.5
    """Concentration of the Dirichlet partition (smaller: more skewed)."""
    min_client_size: int = 8
    """Natural partition: a client needs at least this many examples (speeches; paragraphs or windows of your text); smaller roles or documents are the server's data."""
    test_fraction: float = 0.2
    """Fraction of every client's examples held out as its test split."""
    seq_len: int = 64
    """Tokens per training / evaluation window."""
    max_examples: Optional[int] = 32  # windows kept per client (bounds the padded client axis)
    max_clients: Optional[int] = None  # keep only the largest clients
    max_eval_windows: Optional[int] = 256
    """Windows kept of each evaluation set (client test, held-out text, server data); None keeps all."""
    server_domain: str = (
        "target"  # one of SERVER_DOMAINS (the MEC environment's calibration and live mode use "modern")
    )
    server_windows: Optional[int] = None  # windows of server data kept (None: max_eval_windows)
    seed: int = 0
    """Seed of the partition, the split and the window subsampling."""

    def validate(self) -> None:
        if self.partition not in PARTITIONS:
            raise ValueError(f"TaskConfig.partition must be one of {PARTITIONS}, got {self.partition!r}")
        if self.server_domain not in SERVER_DOMAINS:
            raise ValueError(f"TaskConfig.server_domain must be one of {SERVER_DOMAINS}, got {self.server_domain!r}")
        for name in ("n_clients", "min_client_size"):
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


class TextTask(NamedTuple):
    """The task at the text level: everything a run needs except the tokenizer."""

    train: data_lib.TextClients  # every client's training examples
    test: data_lib.TextClients  # every client's test examples (maybe none)
    heldout_docs: tuple  # names of the held-out documents (plays)
    heldout: tuple  # their examples (empty: no held-out text)
    server: tuple  # the server's own examples
    summary: str  # one line: the corpus, its clients and held-out text

    @property
    def n_clients(self) -> int:
        return len(self.train)


class Task(NamedTuple):
    train: FedData  # the clients' training windows
    names: tuple  # client names ("play/role", or a document's name)
    client_test: Optional[tuple]  # (tokens, mask): every client's test split, pooled; None if there is none
    heldout: Optional[tuple]  # (tokens, mask): the held-out text (plug-in perplexity); None if there is none
    server: tuple  # (tokens, mask): the server's own data
    n_tokens: int  # real training tokens over all clients


def _words(corpus) -> tuple:
    """('speeches', 'plays', 'roles') for Shakespeare, ('examples', 'documents', 'documents') otherwise."""
    if corpus.spelling == "custom":
        return "examples", "documents", "documents"
    return "speeches", "plays", "(play, role) pairs"


def _partition(cfg: TaskConfig, train_corpus) -> tuple:
    """(clients, server texts) of the training corpus."""
    examples, docs, pairs = _words(train_corpus)
    if cfg.partition == "natural":
        groups = train_corpus.clients()
        big = {key: texts for key, texts in groups.items() if len(texts) >= cfg.min_client_size}
        if not big:
            largest = max((len(t) for t in groups.values()), default=0)
            raise ValueError(
                f"TaskConfig.min_client_size: none of the {len(groups)} {pairs} has >= {cfg.min_client_size} {examples} "
                f"(the largest has {largest}); lower it, or use TaskConfig.partition 'iid' or 'dirichlet'"
            )
        clients = data_lib.TextClients(tuple(f"{p}/{r}" if r else p for p, r in big), tuple(big.values()))
        server = [t for key, texts in groups.items() if key not in big for t in texts]
        return clients, server
    texts = [s.text for s in train_corpus.speeches]
    if cfg.n_clients > len(texts):
        raise ValueError(
            f"TaskConfig.n_clients ({cfg.n_clients}) is more than the {len(texts)} training {examples}; "
            "lower it" + ("" if train_corpus.spelling != "custom" else ", or cut the text finer (TextConfig.unit)")
        )
    if cfg.partition == "iid":
        return data_lib.iid_clients(texts, cfg.n_clients, seed=cfg.seed), []
    labels = [s.play for s in train_corpus.speeches]
    try:
        return data_lib.dirichlet_clients(texts, labels, cfg.n_clients, cfg.dirichlet_alpha, seed=cfg.seed), []
    except ValueError:
        raise ValueError(
            f"TaskConfig.dirichlet_alpha ({cfg.dirichlet_alpha}): no Dirichlet draw over the {len(set(labels))} {docs} gave "
            f"each of the TaskConfig.n_clients ({cfg.n_clients}) clients an example; raise dirichlet_alpha or lower n_clients"
        ) from None


def _modern_server_texts(cache_dir=None) -> list:
    """Public text of another domain for the server: the modern-spelling speeches of Shakespeare's
    training plays (the foundation model's own pretraining text; the held-out plays stay out)."""
    return data_lib.pretraining_texts(data_lib.load_shakespeare("modern", cache_dir=cache_dir))


def plan_task(cfg: TaskConfig, cache_dir=None) -> TextTask:
    """The text-level task: loads and checks the corpus, holds out documents, partitions the rest.
    Every problem with the data is a ValueError naming the option, raised before any model exists."""
    corpus = data_lib.load_corpus(cfg.text, cache_dir=cache_dir)
    held_docs = data_lib.heldout_documents(corpus, cfg.text)
    train_corpus, held_corpus = corpus.select(exclude=held_docs), corpus.select(plays=held_docs)
    if not train_corpus.speeches:
        raise ValueError(
            f"TextConfig.heldout_docs: every document of {cfg.text.describe()} is held out; nothing is left to train on"
        )
    clients, server = _partition(cfg, train_corpus)
    if cfg.max_clients is not None and len(clients) > cfg.max_clients:
        order = np.argsort([-n for n in clients.sizes], kind="stable")[: cfg.max_clients]
        clients = data_lib.TextClients(
            tuple(clients.names[i] for i in order), tuple(clients.examples[i] for i in order)
        )
    train, test = data_lib.train_test_split(clients, cfg.test_fraction, seed=cfg.seed)
    if cfg.server_domain == "modern":
        server = _modern_server_texts(cache_dir)
    elif not server:  # no natural leftovers: the server holds a sample of the clients' text
        server = [t for ex in train.examples[:: max(1, len(train) // 20)] for t in ex]
    examples, docs, _ = _words(corpus)
    names = ", ".join(held_docs[:4]) + (", ..." if len(held_docs) > 4 else "")
    held = (
        f"{len(held_docs)} held-out {docs if len(held_docs) > 1 else docs[:-1]} ({names})"
        if held_docs
        else f"no held-out {docs}"
    )
    summary = (
        f"{cfg.text.describe()}: {len(clients)} {cfg.partition} clients, {sum(clients.sizes):,} {examples}; {held}"
    )
    return TextTask(train, test, tuple(held_docs), tuple(s.text for s in held_corpus.speeches), tuple(server), summary)


def _windows(texts, tokenizer, seq_len: int, cap: Optional[int], seed: int) -> Optional[tuple]:
    """(tokens, mask) windows covering `texts` (at most `cap`, a seeded choice); None when there is no text."""
    if not texts:
        return None
    tokens, mask = data_lib.eval_windows(texts, tokenizer, seq_len)
    if cap is not None and len(tokens) > cap:
        keep = np.sort(np.random.default_rng(seed).permutation(len(tokens))[:cap])
        tokens, mask = tokens[keep], mask[keep]
    return tokens, mask.astype(np.float32)


def tokenize_task(plan: TextTask, cfg: TaskConfig, tokenizer) -> Task:
    """Token windows of a planned task."""
    client_data = data_lib.tokenize_clients(plan.train, tokenizer, cfg.seq_len, max_examples=cfg.max_examples)
    cap, seed = cfg.max_eval_windows, cfg.seed
    return Task(
        train=FedData.from_arrays(client_data.tokens, client_data.mask, client_data.counts),
        names=client_data.names,
        client_test=_windows([t for ex in plan.test.examples for t in ex], tokenizer, cfg.seq_len, cap, seed),
        heldout=_windows(plan.heldout, tokenizer, cfg.seq_len, cap, seed),
        server=_windows(plan.server, tokenizer, cfg.seq_len, cfg.server_windows or cap, seed),
        n_tokens=int(np.asarray(client_data.mask).sum()),
    )


def build_task(cfg: TaskConfig, tokenizer, cache_dir=None) -> Task:
    """`tokenize_task(plan_task(cfg), cfg, tokenizer)`."""
    return tokenize_task(plan_task(cfg, cache_dir), cfg, tokenizer)


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
    return task._replace(
        train=train, names=tuple(task.names[i] for i in ids), n_tokens=int(np.asarray(train.mask).sum())
    )


__all__ = [
    "PARTITIONS",
    "SERVER_DOMAINS",
    "TaskConfig",
    "TextTask",
    "Task",
    "plan_task",
    "tokenize_task",
    "build_task",
    "device_population",
]
