"""The corpus data model shared by every text source: speeches, corpora, statistics.

A `Corpus` is an ordered tuple of `Speech`es. Each speech belongs to a *document* (`play`: a play
id for Shakespeare, a file name for a user's folder) and a *speaker* (`role`). The pair
`(play, role)` is the natural federated client (LEAF's Shakespeare clients), so any corpus a user
brings can be partitioned the same way as the default one.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

SPELLINGS = ("modern", "folio", "custom")


@dataclass(frozen=True)
class Speech:
    """One uninterrupted speech: the lines one role speaks before another role speaks."""

    play: str  # document id: "hamlet", or a file stem for a user's folder
    role: str  # speaker within the document: "HAMLET", or a paragraph group "part0003"
    text: str  # the spoken lines, joined by "\n", stage directions removed

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

    def select(self, plays: Optional[Iterable[str]] = None, exclude: Iterable[str] = ()) -> "Corpus":
        """The speeches of `plays` (all when None) minus those of `exclude`.

        Unknown play names are an error: a typo in a held-out list would otherwise silently leak
        the held-out plays into training.
        """
        known = set(self.plays)
        keep = known if plays is None else set(plays)
        drop = set(exclude)
        unknown = sorted((keep | drop) - known)
        if unknown:
            raise ValueError(f"unknown play(s) {unknown}; this corpus has {sorted(known)}")
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
    width = max((len(p) for p in per_play), default=4)
    lines = [str(stats), f"  {'play':<{width}}  {'roles':>5}  {'speeches':>8}  {'characters':>10}"]
    for play, (roles, n, chars) in per_play.items():
        lines.append(f"  {play:<{width}}  {len(roles):>5}  {n:>8}  {chars:>10,}")
    return "\n".join(lines)


# --- a user's own folder of text files --------------------------------------------------------

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def split_paragraphs(text: str) -> list:
    """Blank-line separated paragraphs, stripped, empty ones dropped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def load_text_folder(
    folder,
    *,
    pattern: str = "*.txt",
    paragraphs_per_group: Optional[int] = None,
    encoding: str = "utf-8",
) -> Corpus:
    """Load every file matching `pattern` under `folder` (recursively, sorted) as a document.

    paragraphs_per_group=None: each file is one speech, role "document" (one client per file).
    paragraphs_per_group=k:    each paragraph is a speech and consecutive groups of k paragraphs
                               share a role "part0000", "part0001", ..., so a long file yields
                               several (file, group) clients that partition like (play, role).
    Document ids are the paths relative to `folder` without the suffix ("books/emma").
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"text folder {root} does not exist or is not a directory")
    if paragraphs_per_group is not None and paragraphs_per_group < 1:
        raise ValueError(f"paragraphs_per_group must be None or >= 1, got {paragraphs_per_group}")
    files = sorted(p for p in root.rglob(pattern) if p.is_file())
    if not files:
        raise FileNotFoundError(f"no files matching {pattern!r} under {root}")
    speeches = []
    for path in files:
        doc = path.relative_to(root).with_suffix("").as_posix()
        text = path.read_text(encoding=encoding)
        if paragraphs_per_group is None:
            if text.strip():
                speeches.append(Speech(doc, "document", text.strip()))
            continue
        for i, paragraph in enumerate(split_paragraphs(text)):
            speeches.append(Speech(doc, f"part{i // paragraphs_per_group:04d}", paragraph))
    if not speeches:
        raise ValueError(f"all {len(files)} files matching {pattern!r} under {root} are empty")
    return Corpus(tuple(speeches), "custom")


__all__ = [
    "SPELLINGS",
    "Speech",
    "Corpus",
    "CorpusStats",
    "corpus_stats",
    "format_stats",
    "split_paragraphs",
    "load_text_folder",
]
