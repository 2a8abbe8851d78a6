"""Federated partitions: natural (play, role) clients, IID, Dirichlet, and the padded token arrays."""

import numpy as np
import pytest

from fedpeat_jax.data.corpus import Corpus, Speech
from fedpeat_jax.data.partition import (
    DEFAULT_HELDOUT_PLAYS,
    ClientData,
    chunk_stream,
    dirichlet_clients,
    dirichlet_partition,
    eval_windows,
    heldout_texts,
    iid_clients,
    iid_partition,
    natural_clients,
    pick_heldout_plays,
    pretraining_texts,
    pretraining_windows,
    split_heldout,
    token_stream,
    tokenize_clients,
    train_test_split,
)


class CharTokenizer:
    """A tokenizer with only `encode`: partitioning must not depend on Hugging Face."""

    eos_token_id = 1
    pad_token_id = 0

    def encode(self, text):
        return [2 + (ord(c) % 200) for c in text]

    def decode(self, ids):
        return "".join(chr(i - 2) for i in ids if i >= 2)


def _corpus(spelling="modern"):
    """Plays p0..p5 (p5 = a held-out play); role r_k of a play speaks k + 1 times."""
    speeches = []
    plays = ["p0", "p1", "p2", "p3", "p4", DEFAULT_HELDOUT_PLAYS[0]]
    for play in plays:
        for k in range(6):
            for i in range(k + 1):
                speeches.append(Speech(play, f"R{k}", f"{play} R{k} speech {i}."))
    return Corpus(tuple(speeches), spelling)


def _all(clients):
    return sorted(e for ex in clients.examples for e in ex)


# --- natural clients ----------------------------------------------------------------------------


def test_natural_clients_respect_min_size_and_exclude_held_out_plays():
    corpus = _corpus()
    clients = natural_clients(corpus, min_speeches=3)
    assert len(clients) == 5 * 4  # roles R2..R5 of the five training plays
    assert min(clients.sizes) >= 3
    assert all(not name.startswith(DEFAULT_HELDOUT_PLAYS[0]) for name in clients.names)
    assert clients.names[0] == "p0/R2" and clients.examples[0] == (
        "p0 R2 speech 0.",
        "p0 R2 speech 1.",
        "p0 R2 speech 2.",
    )
    # Every speech of every kept client is there exactly once, in text order.
    kept = [s.text for s in corpus.speeches if s.play != DEFAULT_HELDOUT_PLAYS[0] and int(s.role[1:]) >= 2]
    assert _all(clients) == sorted(kept)
    # A user's corpus has no default held-out plays; () keeps everything.
    assert len(natural_clients(_corpus("custom"), min_speeches=3)) == 6 * 4
    assert len(natural_clients(corpus, min_speeches=1, exclude_plays=())) == 6 * 6
    with pytest.raises(ValueError, match="unknown play"):
        natural_clients(corpus, exclude_plays=["not_a_play"])


def test_train_test_split_is_deterministic_covers_once_and_keeps_both_sides():
    clients = natural_clients(_corpus(), min_speeches=2)
    train, test = train_test_split(clients, 0.25, seed=7)
    again_train, again_test = train_test_split(clients, 0.25, seed=7)
    assert (train, test) == (again_train, again_test)
    assert train_test_split(clients, 0.25, seed=8) != (train, test)
    assert train.names == test.names == clients.names
    for full, tr, te in zip(clients.examples, train.examples, test.examples):
        assert sorted(tr + te) == sorted(full) and not set(tr) & set(te)
        assert len(tr) >= 1 and len(te) >= 1
        assert list(tr) == [e for e in full if e in tr]  # text order kept
    # A client's split does not depend on which other clients exist.
    sub = natural_clients(_corpus(), min_speeches=5)
    sub_train, _ = train_test_split(sub, 0.25, seed=7)
    name = sub.names[0]
    assert sub_train.examples[0] == train.examples[train.names.index(name)]


def test_pick_heldout_plays_is_deterministic_and_order_free():
    plays = [f"play{i}" for i in range(20)]
    picked = pick_heldout_plays(plays, 3, seed=1)
    assert picked == pick_heldout_plays(reversed(plays), 3, seed=1)
    assert len(set(picked)) == 3 and set(picked) <= set(plays)
    assert pick_heldout_plays(plays, 3, seed=2) != picked
    with pytest.raises(ValueError):
        pick_heldout_plays(plays, 20)


def test_split_heldout_and_pretraining_texts_exclude_held_out_plays():
    corpus = _corpus()
    train, held = split_heldout(corpus)
    assert held.plays == (DEFAULT_HELDOUT_PLAYS[0],)
    assert DEFAULT_HELDOUT_PLAYS[0] not in train.plays and len(train) + len(held) == len(corpus)
    texts, held_texts = pretraining_texts(corpus), heldout_texts(corpus)
    assert texts == [s.text for s in train.speeches] and held_texts == [s.text for s in held.speeches]
    assert not any(t.startswith(DEFAULT_HELDOUT_PLAYS[0]) for t in texts)
    assert all(t.startswith(DEFAULT_HELDOUT_PLAYS[0]) for t in held_texts)
    assert pretraining_texts(corpus, exclude_plays=()) == [s.text for s in corpus.speeches]
    assert train.play_texts()["p1"] == "\n\n".join(t for t in texts if t.startswith("p1 "))


# --- IID and Dirichlet ----------------------------------------------------------------------------


def test_iid_partition_covers_every_example_once_and_is_deterministic():
    parts = iid_partition(103, 10, seed=3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(103))
    assert {len(p) for p in parts} == {10, 11}
    assert all(np.array_equal(a, b) for a, b in zip(parts, iid_partition(103, 10, seed=3)))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, iid_partition(103, 10, seed=4)))
    texts = [f"t{i}" for i in range(103)]
    assert _all(iid_clients(texts, 10, seed=3)) == sorted(texts)


@pytest.mark.parametrize("alpha", [0.05, 1.0, 100.0])
def test_dirichlet_partition_covers_every_example_once(alpha):
    labels = [i % 7 for i in range(700)]
    parts = dirichlet_partition(labels, 12, alpha, seed=0, min_size=5)
    assert sorted(np.concatenate(parts).tolist()) == list(range(700))
    assert min(len(p) for p in parts) >= 5
    again = dirichlet_partition(labels, 12, alpha, seed=0, min_size=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_dirichlet_alpha_controls_label_skew():
    labels = [i % 10 for i in range(2000)]

    def mean_labels_per_client(alpha):
        parts = dirichlet_partition(labels, 10, alpha, seed=0)
        return np.mean([len({labels[i] for i in p}) for p in parts])

    assert mean_labels_per_client(0.05) < 4 < 9.5 < mean_labels_per_client(100.0)
    with pytest.raises(ValueError, match="tries"):
        dirichlet_partition(labels[:30], 10, 0.01, seed=0, min_size=3, max_tries=5)


def test_dirichlet_clients_over_a_corpus_use_plays_as_labels():
    corpus = _corpus()
    texts, plays = [s.text for s in corpus.speeches], [s.play for s in corpus.speeches]
    clients = dirichlet_clients(texts, plays, 4, alpha=0.5, seed=1)
    assert clients.names == ("client0000", "client0001", "client0002", "client0003")
    assert _all(clients) == sorted(texts)


# --- token arrays ---------------------------------------------------------------------------------


def test_chunk_stream_pads_or_drops_the_last_window():
    tokens, mask = chunk_stream(np.arange(10), 4, pad_id=-1)
    assert tokens.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, -1, -1]]
    assert mask.sum() == 10 and mask[2].tolist() == [True, True, False, False]
    dropped, _ = chunk_stream(np.arange(10), 4, pad_id=-1, drop_remainder=True)
    assert dropped.shape == (2, 4)
    with pytest.raises(ValueError):
        chunk_stream(np.arange(10), 1, 0)


def test_tokenize_clients_shapes_masks_counts_and_content():
    tok = CharTokenizer()
    clients = natural_clients(_corpus(), min_speeches=2)
    data = tokenize_clients(clients, tok, seq_len=16)
    C = len(clients)
    assert isinstance(data, ClientData) and data.names == clients.names
    assert data.tokens.dtype == np.int32 and data.mask.dtype == bool and data.counts.dtype == np.int32
    assert data.tokens.shape[0] == data.mask.shape[0] == data.counts.shape[0] == C
    assert data.tokens.shape[1] == data.counts.max() and data.tokens.shape[2] == 16
    for c, examples in enumerate(clients.examples):
        stream = token_stream(examples, tok)
        assert len(stream) == sum(len(e) + 1 for e in examples)  # eos after each speech
        assert data.counts[c] == -(-len(stream) // 16)
        real = data.tokens[c][data.mask[c]]
        assert real.tolist() == stream.tolist()  # real tokens, in order, nothing lost
        assert not data.mask[c, data.counts[c] :].any() and (data.tokens[c][~data.mask[c]] == tok.pad_token_id).all()
        assert data.mask[c, : data.counts[c], 0].all()  # every counted window starts with a real token
    assert data.n_tokens.tolist() == [int(m.sum()) for m in data.mask]


def test_tokenize_clients_caps_and_fixed_window_axis():
    tok = CharTokenizer()
    clients = natural_clients(_corpus(), min_speeches=2)
    capped = tokenize_clients(clients, tok, seq_len=16, max_examples=2, n_examples=5)
    assert capped.tokens.shape[1] == 5 and capped.counts.max() == 2
    with pytest.raises(ValueError, match="n_examples"):
        tokenize_clients(clients, tok, seq_len=16, n_examples=1)


def test_client_data_is_a_pytree_that_vmaps_over_clients():
    import jax
    import jax.numpy as jnp

    data = tokenize_clients(natural_clients(_corpus(), min_speeches=2), CharTokenizer(), seq_len=8)
    leaves = jax.tree.leaves(data)
    assert len(leaves) == 3  # tokens, mask, counts; names are static metadata
    per_client = jax.vmap(lambda d: jnp.sum(d.mask) + 0 * d.counts)(jax.tree.map(jnp.asarray, data))
    assert per_client.tolist() == data.n_tokens.tolist()


def test_pretraining_and_eval_windows():
    tok = CharTokenizer()
    texts = ["abcdefg", "hij"]
    stream = token_stream(texts, tok)
    assert stream.tolist() == tok.encode("abcdefg") + [1] + tok.encode("hij") + [1]
    windows = pretraining_windows(texts, tok, 4)
    assert windows.shape == (3, 4) and windows.ravel().tolist() == stream[:12].tolist()
    tokens, mask = eval_windows(texts, tok, 5)
    assert tokens.shape == (3, 5) and tokens[mask].tolist() == stream.tolist()
