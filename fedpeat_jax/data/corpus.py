"""The corpus data model shared by every text source: speeches, corpora, statistics.

A `Corpus` is an ordered tuple of `Speech`es: the examples of the text. Each belongs to a
*document* (`play`: a play id for Shakespeare, a file for a user's text) and a *speaker* (`role`:
a Shakespeare role; empty for a user's text). The pair `(play, role)` is the natural federated
client: LEAF's (play, role) clients for Shakespeare, one client per file for a user's text.
Messages and statistics speak of plays, roles and speeches only for Shakespeare, and of
documents and examples otherwise.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SPELLINGS = ("modern", "folio", "custom")


@dataclass(frozen=True)
class Speech:
    """One example: for Shakespeare, the lines one role speaks before another role speaks; for
    a user's text, a paragraph or a window of words."""

    play: str  # document id: "hamlet", or a file's path in a user's folder ("books/emma")
    role: str  # speaker within the document ("HAMLET"); "" for a user's text
    text: str  # the spoken lines joined by "\n" (stage directions removed), or the paragraph/window

    @property
    def client(self) -> tuple:
        return (self.play, self.role)


@dataclass(frozen=True)
class Corpus:
    """An ordered collection of speeches, all in one spelling convention."""

    speeches: tuple
    spelling: str  # one of SPELLINGS

    def __post_init__(self):
        object.__setattr__(self, "speeches", tuple(self.speeches))
        if self.spelling not in SPELLINGS:
            raise ValueError(f"Corpus.spelling must be one of {SPELLINGS}, got {self.spelling!r}")
        bad = [s for s in self.speeches if not isinstance(s, Speech)]
        if bad:
            raise TypeError(f"Corpus.speeches must hold Speech objects, got {type(bad[0]).__name__}")

    def __len__(self) -> int:
        return len(self.speeches)

    @property
    def plays(self) -> tuple:
        """Document ids in order of first appearance."""
        return tuple(dict.fromkeys(s.play for s in self.speeches))

    def clients(self) -> dict:
        """{(play, role): [speech text, ...]} in order of first appearance (speeches in text order)."""
        out: dict = {}
        for s in self.speeches:
            out.setdefault(s.client, []).append(s.text)
        return out

    def select(self, plays: Optional[Iterable[str]] = None, exclude: Iterable[str] = ()) -> Corpus:
        """The speeches of `plays` (all when None) minus those of `exclude`.

        Unknown play names are an error: a typo in a held-out list would otherwise silently leak
        the held-out plays into training.
        """
        known = set(self.plays)
        keep = known if plays is None else set(plays)
        drop = set(exclude)
        unknown = sorted((keep | drop) - known)
        if unknown:
            what = "document(s)" if self.spelling == "custom" else "play(s)"
            raise ValueError(f"unknown {what} {unknown}; this corpus has {sorted(known)}")
        kept = tuple(s for s in self.speeches if s.play in keep and s.play not in drop)
        return Corpus(kept, self.spelling)

    def play_texts(self, separator: str = "\n\n") -> dict:
        """{play: its speeches joined by `separator`}: whole documents, e.g. for pretraining."""
        out: dict = {}
        for s in self.speeches:
            out.setdefault(s.play, []).append(s.text)
        return {play: separator.join(texts) for play, texts in out.items()}


@dataclass(frozen=True)
class CorpusStats:
    spelling: str
    plays: int
    roles: int  # distinct (play, role) pairs
    speeches: int
    characters: int
    speeches_per_role_median: float
    largest_roles: tuple  # ((play, role, speeches), ...) for the five largest roles

    def __str__(self) -> str:
        if self.spelling == "custom":
            top = ", ".join(f"{p} ({n})" for p, _, n in self.largest_roles)
            return (
                f"your text: {self.plays} documents, {self.speeches:,} examples, {self.characters:,} characters; "
                f"median {self.speeches_per_role_median:g} examples per document; largest documents: {top}"
            )
        top = ", ".join(f"{p}/{r} ({n})" for p, r, n in self.largest_roles)
        return (
            f"{self.spelling} corpus: {self.plays} plays, {self.roles} (play, role) pairs, "
            f"{self.speeches:,} speeches, {self.characters:,} characters; "
            f"median {self.speeches_per_role_median:g} speeches per role; largest roles: {top}"
        )


def corpus_stats(corpus: Corpus) -> CorpusStats:
    """Counts that describe a corpus (what LEAF reports for its Shakespeare split)."""
    per_role = Counter(s.client for s in corpus.speeches)
    sizes = sorted(per_role.values())
    median = 0.0
    if sizes:
        mid = len(sizes) // 2
        median = float(sizes[mid]) if len(sizes) % 2 else (sizes[mid - 1] + sizes[mid]) / 2
    return CorpusStats(
        spelling=corpus.spelling,
        plays=len(corpus.plays),
        roles=len(per_role),
        speeches=len(corpus.speeches),
        characters=sum(len(s.text) for s in corpus.speeches),
        speeches_per_role_median=median,
        largest_roles=tuple((p, r, n) for (p, r), n in per_role.most_common(5)),
    )


def format_stats(corpus: Corpus) -> str:
    """A multi-line summary: totals, then one line per play."""
    stats = corpus_stats(corpus)
    per_play: dict = {}
    for s in corpus.speeches:
        entry = per_play.setdefault(s.play, [set(), 0, 0])
        entry[0].add(s.role)
        entry[1] += 1
        entry[2] += len(s.text)
    width = max((len(p) for p in per_play), default=8)
    if corpus.spelling == "custom":
        lines = [str(stats), f"  {'document':<{width}}  {'examples':>8}  {'characters':>10}"]
        lines += [f"  {doc:<{width}}  {n:>8}  {chars:>10,}" for doc, (_, n, chars) in per_play.items()]
        return "\n".join(lines)
    lines = [str(stats), f"  {'play':<{width}}  {'roles':>5}  {'speeches':>8}  {'characters':>10}"]
    for play, (roles, n, chars) in per_play.items():
        lines.append(f"  {play:<{width}}  {len(roles):>5}  {n:>8}  {chars:>10,}")
    return "\n".join(lines)


# --- a user's own text files ----------------------------------------------------------------

UNITS = ("paragraph", "window")
UNDECODABLE = ("error", "skip")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_WORD = re.compile(r"\S+")


class TextFileWarning(UserWarning):
    """A file of a user's corpus was skipped (empty, or not text and `undecodable="skip"`)."""


class NotTextError(ValueError):
    """A file of a user's corpus is not text in the expected encoding."""


def split_paragraphs(text: str) -> list:
    """Blank-line separated paragraphs, stripped, empty ones dropped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def split_windows(text: str, words: int) -> list:
    """Consecutive pieces of `words` whitespace-separated words each (the last may be shorter),
    cut from the text itself, so line breaks inside a piece are kept."""
    if words < 1:
        raise ValueError(f"words per window must be >= 1, got {words}")
    spans = [m.span() for m in _WORD.finditer(text)]
    return [text[spans[i][0] : spans[min(i + words, len(spans)) - 1][1]] for i in range(0, len(spans), words)]


def read_text_file(path: Path, encoding: str = "utf-8") -> str:
    """The file's text; a NotTextError naming the file if it is not text in `encoding`."""
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise NotTextError(f"{path} is not a text file (it contains NUL bytes)")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise NotTextError(f"{path} is not valid {encoding} text (byte {e.start}: {e.reason})") from None


def text_files(source, pattern: str = "*.txt") -> list:
    """The files of a corpus: `source` itself if it is a file, else every file under the folder
    `source` matching `pattern` (recursively, sorted)."""
    root = Path(source).expanduser()
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist (expected a folder of text files or one text file)")
    files = sorted(p for p in root.rglob(pattern) if p.is_file())
    if not files:
        present = sorted(p.name for p in root.iterdir())[:8]
        raise FileNotFoundError(f"no files matching {pattern!r} under {root} (it holds {present or 'nothing'})")
    return files


def document_id(path: Path, source) -> str:
    """A document's name: its path relative to the corpus folder without the suffix ("books/emma")."""
    root = Path(source).expanduser()
    return path.stem if root.is_file() else path.relative_to(root).with_suffix("").as_posix()


def load_text_folder(
    source,
    *,
    pattern: str = "*.txt",
    unit: str = "paragraph",
    window_words: int = 128,
    encoding: str = "utf-8",
    undecodable: str = "error",
) -> Corpus:
    """A user's corpus: every file of `text_files(source, pattern)` is a document (the `play` of
    its speeches, with an empty `role`), cut into examples:

    unit="paragraph": blank-line separated paragraphs;
    unit="window":    consecutive windows of `window_words` words (for text without blank lines).

    Empty files are skipped with a `TextFileWarning`. A file that is not text in `encoding` (or
    holds NUL bytes) raises a ValueError naming it, or with `undecodable="skip"` is skipped with a
    warning.
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    if undecodable not in UNDECODABLE:
        raise ValueError(f"undecodable must be one of {UNDECODABLE}, got {undecodable!r}")
    files = text_files(source, pattern)
    speeches = []
    for path in files:
        try:
            text = read_text_file(path, encoding)
        except NotTextError as e:
            if undecodable == "error":
                raise
            warnings.warn(f"skipped {e}", TextFileWarning, stacklevel=2)
            continue
        pieces = split_paragraphs(text) if unit == "paragraph" else split_windows(text, window_words)
        if not pieces:
            warnings.warn(f"skipped {path}: it holds no text", TextFileWarning, stacklevel=2)
            continue
        doc = document_id(path, source)
        speeches.extend(Speech(doc, "", piece) for piece in pieces)
    if not speeches:
        raise ValueError(
            f"no text in the {len(files)} file(s) of {Path(source).expanduser()} (every one is empty or was skipped)"
        )
    return Corpus(tuple(speeches), "custom")


__all__ = [
    "SPELLINGS",
    "Speech",
    "Corpus",
    "CorpusStats",
    "corpus_stats",
    "format_stats",
    "UNITS",
    "UNDECODABLE",
    "TextFileWarning",
    "NotTextError",
    "split_paragraphs",
    "split_windows",
    "read_text_file",
    "text_files",
    "document_id",
    "load_text_folder",
]
