"""Byte-level BPE: trained on our text, exact round trip, saved in a folder transformers can load."""

from pathlib import Path

import pytest

from fedpeat_jax.data.partition import encode_texts
from fedpeat_jax.data.shakespeare import load_shakespeare
from fedpeat_jax.data.tokenizer import EOS_TOKEN, load_tokenizer, special_ids, train_bpe_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "shakespeare"


@pytest.fixture(scope="module")
def texts():
    corpus = load_shakespeare("modern", texts_dir=FIXTURES)
    return [s.text for s in corpus.speeches] + [s.text for s in load_shakespeare("folio", texts_dir=FIXTURES).speeches]


@pytest.fixture(scope="module")
def trained(texts, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    return train_bpe_tokenizer(texts, vocab_size=400, min_frequency=1, save_dir=directory), directory


def test_trained_tokenizer_round_trips_any_text(trained, texts):
    tok, _ = trained
    samples = texts + ["Unseen wordes: ſ, æ, 😀, tabs\tand\nnewlines  double  spaces."]
    for text in samples:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < len(tok) for i in ids)
    assert len(tok) <= 400
    # BPE learned merges from the training text: a seen line needs far fewer tokens than bytes.
    assert len(tok.encode(texts[0])) < 0.6 * len(texts[0].encode("utf-8"))


def test_eos_is_bos_pad_and_unk(trained):
    tok, _ = trained
    eos = tok.convert_tokens_to_ids(EOS_TOKEN)
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == eos == 0
    assert special_ids(tok) == (0, 0)
    assert tok.encode("plain text")[0] != eos  # encode adds no special tokens


def test_saved_tokenizer_loads_with_transformers(trained, texts):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok, directory = trained
    for loaded in (
        AutoTokenizer.from_pretrained(str(directory)),
        PreTrainedTokenizerFast.from_pretrained(str(directory)),
        load_tokenizer(directory),
    ):
        assert isinstance(loaded, PreTrainedTokenizerFast)
        assert loaded.eos_token == loaded.pad_token == EOS_TOKEN
        assert [loaded.encode(t) for t in texts] == [tok.encode(t) for t in texts]


def test_batch_encoding_matches_encode(trained, texts):
    tok, _ = trained
    assert encode_texts(texts, tok) == [tok.encode(t) for t in texts]


def test_load_tokenizer_gives_a_pad_to_tokenizers_without_one(trained, tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok, _ = trained
    gpt2_like = PreTrainedTokenizerFast(
        tokenizer_object=tok.backend_tokenizer, eos_token=EOS_TOKEN
    )  # like GPT-2: no pad
    gpt2_like.save_pretrained(str(tmp_path))
    assert load_tokenizer(tmp_path, pad_with_eos=False).pad_token is None
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == EOS_TOKEN and special_ids(loaded) == (0, 0)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


def test_vocab_size_must_cover_the_bytes():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(["text"], vocab_size=100)
