"""HIPE TSV I/O and spaCy conversion (fixture: tests/fixtures/hipe/mini-fr.tsv, written by us)."""
from pathlib import Path

import pytest

from spacy_ocrneurons import hipe
from spacy_ocrneurons.hipe import (
    HipeFormatError,
    bio_spans,
    convert_docbin_to_hipe,
    convert_hipe_to_docbin,
    copy_shared_data,
    docs_to_hipe,
    format_hipe_tsv,
    git_blob_sha1,
    hipe_to_docs,
    iter_sentences,
    parse_hipe_tsv,
    read_docbin,
    read_hipe_tsv,
    repair_bio,
    write_hipe_tsv,
)

FIXTURE = Path(__file__).parent / "fixtures" / "hipe" / "mini-fr.tsv"
HEADER = "\t".join(hipe.HIPE_COLUMNS)


def test_read_structure():
    docs = read_hipe_tsv(FIXTURE)
    assert [d.id for d in docs] == ["mini-0001", "mini-ajmc-0002"]
    first, second = docs
    assert first.metadata["hipe2022:date"] == "1908-01-21"
    assert len(first.tokens) == 19 and len(second.tokens) == 5
    # the '#' token is a token, the segment comment sits before the token that follows it
    assert first.tokens[10].text == "#"
    assert first.inner_lines == {11: ["# segment_iiif_link = https://example.org/iiif/1/full/0/default.jpg"]}
    assert first.trailing_lines == [""]
    # AjMC: document_id is not the first comment; all comments stay in order
    assert second.comments[0] == "# hipe2022:original_source = ajmc/commentary.xmi"
    assert second.comments[2] == "# hipe2022:document_id = mini-ajmc-0002"
    tok = second.tokens[2]
    assert tok.led == 0.25 and tok.flags == ["LED0.25", "InPrimaryReference"]
    assert second.tokens[3].no_space_after and second.tokens[3].led == 0.5
    assert first.tokens[17].flags == ["NoSpaceAfter", "EndOfLine", "EndOfSentence"]


def test_round_trip_is_byte_identical(tmp_path):
    docs = read_hipe_tsv(FIXTURE)
    out = tmp_path / "out.tsv"
    write_hipe_tsv(docs, out)
    assert out.read_bytes() == FIXTURE.read_bytes()


@pytest.mark.parametrize(
    "text",
    [
        HEADER + "\n# hipe2022:document_id = a\nx\tO\tO\tO\tO\tO\tO\t_\t_\t_",  # no final newline
        HEADER + "\r\n# hipe2022:document_id = a\r\nx\tO\tO\tO\tO\tO\tO\t_\t_\t_\r\n\r\n\r\n",  # CRLF, 2 blanks
        "\ufeff" + HEADER + "\n# file comment\n\n# hipe2022:document_id = a\n# hipe2022:document_id = b\nx\tO\tO\tO\tO\tO\tO\t_\t_\t_\n",
        HEADER + "\nx\tO\tO\tO\tO\tO\tO\t_\t_\t_\n\ny\tO\tO\tO\tO\tO\tO\t_\t_\t_\n",  # no ids: blank lines split
    ],
)
def test_round_trip_layout_variants(text):
    assert format_hipe_tsv(parse_hipe_tsv(text)) == text


def test_no_document_ids_blank_lines_split_documents():
    text = HEADER + "\nx\tO\tO\tO\tO\tO\tO\t_\t_\t_\n\ny\tO\tO\tO\tO\tO\tO\t_\t_\t_\n"
    assert [len(d.tokens) for d in parse_hipe_tsv(text)] == [1, 1]


def test_malformed_line_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text(HEADER + "\n# hipe2022:document_id = a\nx\tO\tO\n", encoding="utf-8")
    with pytest.raises(HipeFormatError, match=r"bad\.tsv:3: expected 10"):
        read_hipe_tsv(bad)
    bad.write_text("# no header\n", encoding="utf-8")
    with pytest.raises(HipeFormatError, match=r"bad\.tsv:1"):
        read_hipe_tsv(bad)


def test_text_and_offsets_follow_nospaceafter():
    doc = read_hipe_tsv(FIXTURE)[0]
    text = doc.text()
    assert text.startswith("M. Théodore Reinach, député de la\nSavoie. # Le Conseil")
    for tok, (a, b) in zip(doc.tokens, doc.char_offsets()):
        assert text[a:b] == tok.text


def test_bio_helpers():
    assert bio_spans(["I-x", "I-x", "O", "B-y", "I-z", "_"]) == [(0, 2, "x"), (3, 4, "y"), (4, 5, "z")]
    assert repair_bio(["I-x", "O", "I-x", "B-y", "I-y", "_"], outside="O") == ["B-x", "O", "B-x", "B-y", "I-y", "O"]


def test_iter_sentences():
    sents = list(iter_sentences(read_hipe_tsv(FIXTURE)))
    words, tags, spaces = sents[0]
    assert words[:4] == ["M", ".", "Théodore", "Reinach"] and words[-1] == "."
    assert tags[:4] == ["B-pers", "I-pers", "I-pers", "I-pers"] and tags[8] == "B-loc"
    assert spaces[:2] == [False, True]
    # sentence 3 starts with an entity continued from sentence 2: repaired to B-; the orphan I-time too
    assert sents[2][0][:2] == ["municipal", "siège"] and sents[2][1][:2] == ["B-org", "B-time"]
    assert sum(len(s[0]) for s in sents) == 24


def test_hipe_to_docs_entities_sentences_and_extensions():
    docs = hipe_to_docs(read_hipe_tsv(FIXTURE))
    doc = docs[0]
    assert [t.text for t in doc][:4] == ["M", ".", "Théodore", "Reinach"]
    assert doc.text.startswith("M. Théodore Reinach, député de la Savoie. # Le Conseil de Paris municipal")
    assert [(e.text, e.label_) for e in doc.ents] == [
        ("M. Théodore Reinach", "pers"),
        ("Savoie", "loc"),
        ("Le Conseil de Paris municipal", "org"),  # one entity across the sentence boundary
        ("siège", "time"),  # orphan I- repaired into an entity start
    ]
    assert [s.start for s in doc.sents] == [0, 10, 15, 18]
    assert doc[15]._.hipe["NEL-LIT"] == "NIL" and doc[16]._.hipe["MISC"] == "Partial-0:3"
    assert doc._.hipe["doc_id"] == "mini-0001"
    assert [(e.text, e.label_) for e in docs[1].ents] == [("Sophocle", "pers"), ("Ajax", "work"), ("v.", "scope")]
    fine = hipe_to_docs(read_hipe_tsv(FIXTURE), column="NE-FINE-LIT")
    assert fine[1].ents[1].label_ == "work.primlit"


@pytest.mark.parametrize("split", ["document", "sentence", "segment"])
def test_docbin_round_trip_exact(tmp_path, split):
    spacy_path, back = tmp_path / "x.spacy", tmp_path / "back.tsv"
    n = convert_hipe_to_docbin(FIXTURE, spacy_path, split=split)
    assert n == {"document": 2, "sentence": 6, "segment": 3}[split]
    docs = read_docbin(spacy_path)
    assert docs[0][0]._.hipe["MISC"] == "NoSpaceAfter"
    assert convert_docbin_to_hipe(spacy_path, back) == 2
    assert back.read_bytes() == FIXTURE.read_bytes()


def test_docs_to_hipe_takes_predictions_and_fills_other_columns():
    from spacy.tokens import Span

    docs = hipe_to_docs(read_hipe_tsv(FIXTURE))
    doc = docs[0]
    doc.ents = [Span(doc, 5, 6, label="pers"), Span(doc, 8, 9, label="org")]
    out = docs_to_hipe(docs, other_columns="_")
    toks = out[0].tokens
    assert [t.get("NE-COARSE-LIT") for t in toks[4:10]] == ["O", "B-pers", "O", "O", "B-org", "O"]
    assert toks[0].get("NE-COARSE-LIT") == "O" and toks[0].get("NEL-LIT") == "_" and toks[0].get("NE-FINE-LIT") == "_"
    assert toks[0].misc == "NoSpaceAfter"  # MISC is always kept
    assert out[0].comments == read_hipe_tsv(FIXTURE)[0].comments
    kept = docs_to_hipe(docs, other_columns="original")
    assert kept[0].tokens[0].get("NEL-LIT") == "Q1"


def test_docs_to_hipe_plain_doc():
    import spacy
    from spacy.tokens import Doc, Span

    vocab = spacy.vocab.Vocab()
    doc = Doc(vocab, words=["Paris", ",", "\n", "le", "jour", "."], spaces=[False, False, False, True, False, False],
              sent_starts=[True, False, False, False, False, False])
    doc.ents = [Span(doc, 0, 1, label="loc")]
    (hdoc,) = docs_to_hipe([doc])
    assert [t.text for t in hdoc.tokens] == ["Paris", ",", "le", "jour", "."]
    assert hdoc.tokens[0].get("NE-COARSE-LIT") == "B-loc" and hdoc.tokens[0].no_space_after
    assert hdoc.tokens[1].end_of_line and hdoc.tokens[4].end_of_sentence
    assert hdoc.id == "doc-00000"


def test_git_blob_sha1_matches_git():
    assert git_blob_sha1(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert git_blob_sha1(b"hello world\n") == "3b18e512dba79e4c8300dd08aeb37f8e728b8dad"


def test_copy_shared_data(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    files = {"hipe2020/fr/a-dev-fr.tsv": b"a\n", "ajmc/fr/b-dev-fr.tsv": b"b\n"}
    for rel, data in files.items():
        (shared / rel).parent.mkdir(parents=True, exist_ok=True)
        (shared / rel).write_bytes(data)
    monkeypatch.setattr(hipe, "SHARED_DATA_FILES", {rel: git_blob_sha1(d) for rel, d in files.items()})
    paths = copy_shared_data(tmp_path / "assets", shared)
    assert [p.read_bytes() for p in paths] == [b"a\n", b"b\n"]
    (shared / "ajmc/fr/b-dev-fr.tsv").write_bytes(b"changed\n")
    with pytest.raises(ValueError, match="does not match"):
        copy_shared_data(tmp_path / "other", shared)
    with pytest.raises(FileNotFoundError, match="shared data folder not found"):
        copy_shared_data(tmp_path / "assets", tmp_path / "missing")


def test_convert_cli_round_trip(tmp_path):
    from typer.testing import CliRunner

    from spacy_ocrneurons.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(FIXTURE), str(tmp_path / "x.spacy"), "--split", "sentence"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["convert", str(tmp_path / "x.spacy"), str(tmp_path / "x.tsv")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "x.tsv").read_bytes() == FIXTURE.read_bytes()
    bad = runner.invoke(app, ["convert", str(FIXTURE), str(tmp_path / "x.txt")])
    assert bad.exit_code == 1 and "must end in .spacy" in bad.output
