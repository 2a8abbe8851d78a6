"""Federated partitions of a corpus, and the padded token arrays the simulator vmaps over.

Two stages, so that partitioning never depends on the tokenizer:

1. *Text level*: `TextClients` (a name and a tuple of example texts per client), from the natural
   (play, role) split, an IID split or a Dirichlet split; `train_test_split` splits every client.
2. *Token level*: `tokenize_clients` concatenates each client's examples (eos between them), cuts
   the stream into windows of `seq_len` tokens, pads, and stacks everything into `ClientData`
   with a leading client axis.

A window is the model's whole input; next-token training uses inputs `tokens[..., :-1]`,
targets `tokens[..., 1:]` and target weights `mask[..., 1:]`.
"""

from __future__ import annotations

import zlib
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
from flax import struct

from fedpeat_jax.data.corpus import Corpus
from fedpeat_jax.data.tokenizer import special_ids

# Whole plays that the project never trains on: not in pretraining, not in federated training.
# Held-out perplexity (modern for the foundation model, Folio for the downstream task) is measured on
# them. All four exist in both spellings; together about 10% of the text.
DEFAULT_HELDOUT_PLAYS = ("julius_caesar", "macbeth", "richard_ii", "twelfth_night")

# Natural clients with fewer speeches are dropped: about 600 clients per spelling remain once the
# held-out plays are out (TFF's Shakespeare split has 715).
DEFAULT_MIN_SPEECHES = 8


def pick_heldout_plays(plays: Iterable[str], n: int, seed: int = 0) -> tuple:
    """`n` plays drawn deterministically from `plays` (the draw depends on the set, not its order)."""
    pool = sorted(set(plays))
    if not 0 < n < len(pool):
        raise ValueError(f"cannot hold out {n} of {len(pool)} plays; choose 0 < n < {len(pool)}")
    chosen = np.random.default_rng(seed).permutation(len(pool))[:n]
    return tuple(sorted(pool[i] for i in chosen))


def _excluded(corpus: Corpus, exclude_plays) -> tuple:
    """None means the project's held-out plays (those this Shakespeare corpus has; a subset of the
    plays may have been loaded), and none for a user's corpus. An explicit list must name plays
    that exist (Corpus.select checks), so a typo cannot leak a held-out play into training."""
    if exclude_plays is None:
        if corpus.spelling not in ("modern", "folio"):
            return ()
        return tuple(p for p in DEFAULT_HELDOUT_PLAYS if p in set(corpus.plays))
    return tuple(exclude_plays)


def split_heldout(corpus: Corpus, exclude_plays=None) -> tuple:
    """(training corpus, held-out corpus): whole plays, `exclude_plays` as in `natural_clients`."""
    held = _excluded(corpus, exclude_plays)
    return corpus.select(exclude=held), corpus.select(plays=held)


# --- text-level clients -------------------------------------------------------------------------


@dataclass(frozen=True)
class TextClients:
    """Per-client example texts. `examples[c]` is the ordered tuple of client c's texts."""

    names: tuple
    examples: tuple

    def __post_init__(self):
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "examples", tuple(tuple(e) for e in self.examples))
        if len(self.names) != len(self.examples):
            raise ValueError(f"TextClients: {len(self.names)} names but {len(self.examples)} example lists")
        if len(set(self.names)) != len(self.names):
            raise ValueError("TextClients: client names must be unique")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def sizes(self) -> tuple:
        return tuple(len(e) for e in self.examples)


def natural_clients(corpus: Corpus, *, min_speeches: int = DEFAULT_MIN_SPEECHES, exclude_plays=None) -> TextClients:
    """LEAF's clients: one per (play, role) with at least `min_speeches` speeches, named "play/role";
    for a user's text (empty roles) one per document, named after it.

    exclude_plays: plays left out entirely. None = DEFAULT_HELDOUT_PLAYS for a Shakespeare corpus,
    nothing for a user's corpus; pass () to keep every play.
    """
    if min_speeches < 1:
        raise ValueError(f"min_speeches must be >= 1, got {min_speeches}")
    kept = corpus.select(exclude=_excluded(corpus, exclude_plays))
    pairs = [
        (f"{play}/{role}" if role else play, texts)
        for (play, role), texts in kept.clients().items()
        if len(texts) >= min_speeches
    ]
    if not pairs:
        what = "document has" if corpus.spelling == "custom" else "(play, role) has"
        unit = "examples" if corpus.spelling == "custom" else "speeches"
        raise ValueError(f"no {what} >= {min_speeches} {unit}; lower min_speeches")
    return TextClients(tuple(n for n, _ in pairs), tuple(t for _, t in pairs))


def iid_partition(n_examples: int, n_clients: int, seed: int = 0) -> list:
    """Shuffle 0..n_examples-1 and deal it into `n_clients` near-equal index arrays (sorted)."""
    if n_clients < 1 or n_examples < n_clients:
        raise ValueError(f"cannot deal {n_examples} examples to {n_clients} clients")
    order = np.random.default_rng(seed).permutation(n_examples)
    return [np.sort(part) for part in np.array_split(order, n_clients)]


def dirichlet_partition(
    labels: Sequence[Hashable], n_clients: int, alpha: float, seed: int = 0, *, min_size: int = 1, max_tries: int = 1000
) -> list:
    """Label-skewed split: each label's examples are divided among clients by proportions ~ Dir(alpha).

    Small alpha gives each client few labels (for text: few plays); large alpha approaches IID.
    Draws are repeated (deterministically) until every client has >= `min_size` examples.
    """
    if n_clients < 1 or alpha <= 0:
        raise ValueError(f"need n_clients >= 1 and alpha > 0, got n_clients={n_clients}, alpha={alpha}")
    if len(labels) < n_clients * min_size:
        raise ValueError(f"{len(labels)} examples cannot give {n_clients} clients >= {min_size} each")
    rng = np.random.default_rng(seed)
    groups: dict = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    classes = [np.asarray(groups[k]) for k in groups]  # first-appearance order: deterministic
    for _ in range(max_tries):
        parts: list = [[] for _ in range(n_clients)]
        for idx in classes:
            idx = rng.permutation(idx)
            cuts = (np.cumsum(rng.dirichlet(np.full(n_clients, alpha)))[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw in {max_tries} tries gave all {n_clients} clients >= {min_size} "
        "examples; raise alpha, lower min_size or use fewer clients"
    )


def clients_from_partition(examples: Sequence[str], parts: Sequence, prefix: str = "client") -> TextClients:
    """TextClients from index arrays over `examples`, named prefix0000, prefix0001, ..."""
    return TextClients(
        tuple(f"{prefix}{c:04d}" for c in range(len(parts))),
        tuple(tuple(examples[int(i)] for i in part) for part in parts),
    )


def iid_clients(examples: Sequence[str], n_clients: int, seed: int = 0) -> TextClients:
    return clients_from_partition(examples, iid_partition(len(examples), n_clients, seed))


def dirichlet_clients(
    examples: Sequence[str],
    labels: Sequence[Hashable],
    n_clients: int,
    alpha: float,
    seed: int = 0,
    *,
    min_size: int = 1,
) -> TextClients:
    """For a Corpus: examples = [s.text for s in corpus.speeches], labels = [s.play for s in ...]."""
    if len(examples) != len(labels):
        raise ValueError(f"{len(examples)} examples but {len(labels)} labels")
    return clients_from_partition(examples, dirichlet_partition(labels, n_clients, alpha, seed, min_size=min_size))


def train_test_split(clients: TextClients, test_fraction: float = 0.2, seed: int = 0) -> tuple:
    """Split every client's examples into (train, test) TextClients, both keeping text order.

    Each client's draw is seeded by (seed, client name), so it does not change when other clients
    are added or filtered. A client with >= 2 examples gets >= 1 test and >= 1 train example; a
    client with a single example keeps it for training.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    train, test = [], []
    for name, examples in zip(clients.names, clients.examples):
        n = len(examples)
        n_test = 0 if n < 2 else min(n - 1, max(1, round(test_fraction * n)))
        rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
        is_test = np.zeros(n, dtype=bool)
        is_test[rng.permutation(n)[:n_test]] = True
        train.append(tuple(e for e, t in zip(examples, is_test) if not t))
        test.append(tuple(e for e, t in zip(examples, is_test) if t))
    return TextClients(clients.names, tuple(train)), TextClients(clients.names, tuple(test))


# --- token level ------------------------------------------------------------------------------


@struct.dataclass
class ClientData:
    """Padded token windows with a leading client axis (a pytree; `names` is static metadata).

    tokens: int32[C, N, T]  each row a window of T tokens; padding uses the tokenizer's pad id
    mask:   bool[C, N, T]   True on real tokens (windows beyond counts[c] are all False)
    counts: int32[C]        real (non-empty) windows per client
    names:  tuple of C client names
    """

    tokens: np.ndarray
    mask: np.ndarray
    counts: np.ndarray
    names: tuple = struct.field(pytree_node=False, default=())

    @property
    def n_clients(self) -> int:
        return self.tokens.shape[0]

    @property
    def n_tokens(self) -> np.ndarray:
        """int64[C]: real tokens per client (e.g. FedAvg weights)."""
        return np.asarray(self.mask).sum(axis=(1, 2))


def encode_texts(texts: Sequence[str], tokenizer) -> list:
    """Token ids of each text. Uses a Hugging Face fast tokenizer's batch encoder when there is one
    (same ids as `encode`, several times faster); otherwise calls `tokenizer.encode(text)`."""
    texts = list(texts)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch"):
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=True)]
    return [list(tokenizer.encode(t)) for t in texts]


def token_stream(texts: Sequence[str], tokenizer) -> np.ndarray:
    """int32[L]: the texts' tokens concatenated, each text followed by eos (when the tokenizer has one)."""
    eos, _ = special_ids(tokenizer)
    tail = [eos] if eos is not None else []
    ids = [tok for seq in encode_texts(texts, tokenizer) for tok in list(seq) + tail]
    return np.asarray(ids, dtype=np.int32)


def chunk_stream(stream: np.ndarray, seq_len: int, pad_id: int, *, drop_remainder: bool = False) -> tuple:
    """(tokens int32[N, T], mask bool[N, T]): consecutive windows; the last one padded or dropped."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (an input and a target), got {seq_len}")
    stream = np.asarray(stream, dtype=np.int32)
    n = len(stream) // seq_len if drop_remainder else -(-len(stream) // seq_len)
    tokens = np.full((n * seq_len,), pad_id, dtype=np.int32)
    mask = np.zeros((n * seq_len,), dtype=bool)
    used = min(len(stream), n * seq_len)
    tokens[:used] = stream[:used]
    mask[:used] = True
    return tokens.reshape(n, seq_len), mask.reshape(n, seq_len)


def tokenize_clients(
    clients: TextClients,
    tokenizer,
    seq_len: int,
    *,
    max_examples: Optional[int] = None,
    n_examples: Optional[int] = None,
) -> ClientData:
    """Tokenize, window and pad every client into one ClientData.

    max_examples: keep at most this many windows per client (the first ones), bounding memory when
                  a few clients are huge. n_examples: the padded window axis N (default: the largest
                  count); it must be >= every count after the cap.
    """
    _, pad = special_ids(tokenizer)
    windows = [chunk_stream(token_stream(ex, tokenizer), seq_len, pad) for ex in clients.examples]
    if max_examples is not None:
        windows = [(t[:max_examples], m[:max_examples]) for t, m in windows]
    counts = np.asarray([len(t) for t, _ in windows], dtype=np.int32)
    biggest = int(counts.max(initial=0))
    n = biggest if n_examples is None else n_examples
    if n < biggest:
        raise ValueError(
            f"n_examples={n_examples} is smaller than the largest client ({biggest} windows); set max_examples"
        )
    n = max(n, 1)  # keep a real axis even if every client is empty
    tokens = np.full((len(clients), n, seq_len), pad, dtype=np.int32)
    mask = np.zeros((len(clients), n, seq_len), dtype=bool)
    for c, (t, m) in enumerate(windows):
        tokens[c, : len(t)] = t
        mask[c, : len(m)] = m
    return ClientData(tokens=tokens, mask=mask, counts=counts, names=clients.names)


# --- pretraining and evaluation streams ---------------------------------------------------------


def pretraining_texts(corpus: Corpus, exclude_plays=None) -> list:
    """The speeches of the training plays, in order (held-out plays removed as in `natural_clients`).

    Speeches rather than whole plays, so that the pretraining stream has the same shape as a
    client's stream (speech, eos, speech, eos, ...), and because the tokenizer is faster on them.
    """
    train, _ = split_heldout(corpus, exclude_plays)
    return [s.text for s in train.speeches]


def heldout_texts(corpus: Corpus, exclude_plays=None) -> list:
    """The speeches of the held-out plays, in order: the text of held-out perplexity (`eval_windows`)."""
    _, held = split_heldout(corpus, exclude_plays)
    return [s.text for s in held.speeches]


def pretraining_windows(texts: Sequence[str], tokenizer, seq_len: int) -> np.ndarray:
    """int32[N, T]: the texts as one eos-separated stream cut into full windows (remainder dropped)."""
    _, pad = special_ids(tokenizer)
    tokens, _ = chunk_stream(token_stream(texts, tokenizer), seq_len, pad, drop_remainder=True)
    return tokens


def eval_windows(texts: Sequence[str], tokenizer, seq_len: int) -> tuple:
    """(tokens int32[N, T], mask bool[N, T]) covering every token of `texts`; only the last window padded."""
    _, pad = special_ids(tokenizer)
    return chunk_stream(token_stream(texts, tokenizer), seq_len, pad)


__all__ = [
    "DEFAULT_HELDOUT_PLAYS",
    "DEFAULT_MIN_SPEECHES",
    "pick_heldout_plays",
    "split_heldout",
    "TextClients",
    "natural_clients",
    "iid_partition",
    "dirichlet_partition",
    "clients_from_partition",
    "iid_clients",
    "dirichlet_clients",
    "train_test_split",
    "ClientData",
    "encode_texts",
    "token_stream",
    "chunk_stream",
    "tokenize_clients",
    "pretraining_texts",
    "heldout_texts",
    "pretraining_windows",
    "eval_windows",
]
