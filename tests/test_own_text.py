"""A user's own text at the data level: files cut into examples, held-out documents, partitions,
and every problem with the text named before any model exists."""

import re

import pytest

from fedpeat_jax import data as data_lib
from fedpeat_jax.data.corpus import NotTextError, TextFileWarning, load_text_folder, split_windows
from fedpeat_jax.data.source import TextConfig, heldout_documents, load_corpus, training_and_heldout_texts
from fedpeat_jax.tasks import TaskConfig, plan_task


def write_books(folder, n_docs=6, paragraphs=12):
    """`n_docs` files of `paragraphs` distinct paragraphs each (one in a subfolder)."""
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        path = folder / ("part2" if d == 0 else "") / f"book{d}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(
            "\n\n".join(
                f"Book {d}, paragraph {p}: the river ran past the mill\nand the miller sang." for p in range(paragraphs)
            )
            + "\n"
        )
    return folder


def test_paragraphs_windows_subfolders_and_pattern(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("one two\n\n\n three\r\n\r\nfour five six seven\n")
    (tmp_path / "sub" / "b.txt").write_text("only paragraph\n")
    (tmp_path / "notes.md").write_text("not read by default")
    corpus = load_text_folder(tmp_path)
    assert [(s.play, s.role, s.text) for s in corpus.speeches] == [
        ("a", "", "one two"),
        ("a", "", "three"),
        ("a", "", "four five six seven"),
        ("sub/b", "", "only paragraph"),
    ]
    windows = load_text_folder(tmp_path, unit="window", window_words=3)
    assert [s.text for s in windows.speeches if s.play == "a"] == ["one two\n\n\n three", "four five six", "seven"]
    assert load_text_folder(tmp_path, pattern="*.md").plays == ("notes",)
    assert split_windows("a b c d", 2) == ["a b", "c d"] and split_windows("  ", 2) == []
    with pytest.raises(FileNotFoundError, match=r"no files matching '\*.csv'"):
        load_text_folder(tmp_path, pattern="*.csv")


def test_one_text_file_holds_out_its_end(tmp_path):
    book = tmp_path / "novel.txt"
    book.write_text("\n\n".join(f"paragraph {i}" for i in range(20)))
    text = TextConfig(corpus=str(book))
    corpus = load_corpus(text)
    assert corpus.plays == ("novel", "novel (end)")
    assert heldout_documents(corpus, text) == ("novel (end)",)
    train, held, names = training_and_heldout_texts(text)
    assert len(train) == 18 and held == ["paragraph 18", "paragraph 19"] and names == ("novel (end)",)
    assert training_and_heldout_texts(text.replace(heldout_fraction=0.0))[1] == []  # nothing held out: nothing invented


def test_heldout_documents_are_a_fixed_choice_and_can_be_named(tmp_path):
    text = TextConfig(corpus=str(write_books(tmp_path / "books", n_docs=10)))
    corpus = load_corpus(text)
    picked = heldout_documents(corpus, text)
    assert len(picked) == 1 and picked == heldout_documents(load_corpus(text), text)  # pretraining and tuning agree
    assert 2 <= len(heldout_documents(corpus, text.replace(heldout_fraction=0.3))) <= 3  # 10 equal documents
    big = tmp_path / "books" / "big.txt"
    big.write_text("\n\n".join(f"a long paragraph number {i} of the big book" for i in range(400)))
    text = text.replace(heldout_fraction=0.2)
    corpus = load_corpus(text)
    held = heldout_documents(corpus, text)
    words = lambda docs: sum(len(s.text.split()) for s in corpus.speeches if s.play in docs)  # noqa: E731
    assert "big" not in held and 0 < words(held) <= 0.2 * words(
        corpus.plays
    )  # about a fifth of the words, whole documents
    assert (
        heldout_documents(load_corpus(text.replace(unit="window", window_words=7)), text) == held
    )  # the unit does not matter
    assert heldout_documents(corpus, text.replace(heldout_docs=("book4", "part2/book0"))) == ("book4", "part2/book0")
    assert heldout_documents(corpus, text.replace(heldout_docs=())) == ()
    with pytest.raises(ValueError, match=r"TextConfig.heldout_docs: unknown document\(s\) \['book99'\]"):
        heldout_documents(corpus, text.replace(heldout_docs=("book99",)))


def test_relative_and_absolute_folders_are_the_same_corpus(tmp_path, monkeypatch):
    write_books(tmp_path / "books")
    monkeypatch.chdir(tmp_path)
    assert TextConfig(corpus="books") == TextConfig(corpus=str(tmp_path / "books"))


@pytest.mark.parametrize("partition", ["natural", "iid", "dirichlet"])
def test_partitions_of_a_folder_keep_held_out_documents_out(tmp_path, partition):
    text = TextConfig(corpus=str(write_books(tmp_path / "books", n_docs=6)), heldout_fraction=0.34)
    plan = plan_task(TaskConfig(text=text, partition=partition, n_clients=5, dirichlet_alpha=1.0, min_client_size=4))
    assert len(plan.heldout_docs) == 2 and len(plan.heldout) == 2 * 12
    held = set(plan.heldout)
    clients_text = [t for ex in plan.train.examples + plan.test.examples for t in ex]
    assert not held & set(clients_text)
    assert len(clients_text) == 4 * 12  # every training example belongs to exactly one client
    if partition == "natural":
        assert sorted(plan.train.names) == sorted(
            {"book1", "book2", "book3", "book4", "book5", "part2/book0"} - set(plan.heldout_docs)
        )
    else:
        assert plan.n_clients == 5
    assert "held-out documents" in plan.summary and "speech" not in plan.summary and "play" not in plan.summary


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            dict(min_client_size=50),
            r"TaskConfig.min_client_size: none of the 5 documents has >= 50 examples \(the largest has 12\)",
        ),
        (dict(partition="iid", n_clients=500), r"TaskConfig.n_clients \(500\) is more than the 60 training examples"),
        (
            dict(partition="dirichlet", n_clients=60, dirichlet_alpha=0.01),
            r"TaskConfig.dirichlet_alpha \(0.01\).*raise dirichlet_alpha or lower n_clients",
        ),
    ],
)
def test_partition_problems_name_the_option(tmp_path, changes, message):
    text = TextConfig(corpus=str(write_books(tmp_path / "books")))
    with pytest.raises(ValueError, match=message):
        plan_task(TaskConfig(text=text, **changes))


def test_undecodable_and_binary_files_are_named_or_skipped(tmp_path):
    books = write_books(tmp_path / "books", n_docs=3)
    (books / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (books / "image.txt").write_bytes(b"\x89PNG\x00\x00\x00binary")
    (books / "empty.txt").write_text("  \n\n")
    text = TextConfig(corpus=str(books))
    with pytest.raises(
        NotTextError, match=r"TextConfig.corpus: .*image.txt is not a text file \(it contains NUL bytes\).*undecodable"
    ):
        load_corpus(text)
    (books / "image.txt").unlink()
    with pytest.raises(NotTextError, match=r"latin1.txt is not valid utf-8 text \(byte 3"):
        load_corpus(text)
    with pytest.warns(TextFileWarning) as caught:
        corpus = load_corpus(text.replace(undecodable="skip"))
    assert sorted(corpus.plays) == ["book1", "book2", "part2/book0"]
    assert any("latin1.txt" in str(w.message) for w in caught) and any("empty.txt" in str(w.message) for w in caught)
    with pytest.warns(TextFileWarning):  # the right encoding reads it
        assert "latin1" in load_corpus(text.replace(encoding="latin-1")).plays


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(corpus="/no/such/folder"), r"TextConfig.corpus: /no/such/folder does not exist"),
        (dict(unit="sentence"), r"TextConfig.unit must be one of \('paragraph', 'window'\)"),
        (dict(window_words=0), r"TextConfig.window_words must be >= 1"),
        (dict(heldout_fraction=1.0), r"TextConfig.heldout_fraction must be in \[0, 1\)"),
        (dict(encoding="klingon"), r"TextConfig.encoding: unknown encoding 'klingon'"),
        (dict(undecodable="ignore"), r"TextConfig.undecodable must be one of \('error', 'skip'\)"),
        (dict(window_words="64"), r"TextConfig.window_words must be an integer, got '64' \(a string\)"),
        (dict(heldout_docs="book1"), r"TextConfig.heldout_docs must be null or a list of strings, got 'book1'"),
    ],
)
def test_text_config_refuses_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        TextConfig(**changes)


def test_empty_folder_and_all_held_out_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.warns(TextFileWarning), pytest.raises(ValueError, match=r"no text in the 1 file\(s\)"):
        load_corpus(TextConfig(corpus=str(tmp_path / "empty")))
    text = TextConfig(corpus=str(write_books(tmp_path / "books", n_docs=2)), heldout_docs=("book1", "part2/book0"))
    with pytest.raises(ValueError, match="every document of the text in .* is held out"):
        plan_task(TaskConfig(text=text))


def test_statistics_of_your_text_speak_of_documents(tmp_path):
    corpus = load_corpus(TextConfig(corpus=str(write_books(tmp_path / "books", n_docs=2))))
    line = str(data_lib.corpus_stats(corpus))
    assert line.startswith("your text: 2 documents, 24 examples") and "play" not in line and "role" not in line
    assert re.search(r"document +examples +characters", data_lib.format_stats(corpus))
