"""The embedded synthetic sample dataset (assets/sample) and its generator."""
from collections import Counter
from pathlib import Path

import pytest

from spacy_ocrneurons.hipe import bio_spans, format_hipe_tsv, read_hipe_tsv
from spacy_ocrneurons.sample_data import SPLITS, generate_documents, sample_dir, sample_path, write_sample

COMMITTED = Path(__file__).resolve().parent.parent / "assets" / "sample"


def test_regenerated_files_match_committed_ones(tmp_path):
    paths = write_sample(tmp_path)
    assert [p.name for p in paths] == [f"sample-{s}-fr.tsv" for s in SPLITS]
    for path in paths:
        committed = COMMITTED / path.name
        assert committed.is_file(), f"{committed} missing: run `python -m spacy_ocrneurons make-sample`"
        assert path.read_bytes() == committed.read_bytes(), f"{path.name} differs from the committed file"
    assert sum((COMMITTED / p.name).stat().st_size for p in paths) < 300_000


def test_make_sample_cli(tmp_path):
    from typer.testing import CliRunner

    from spacy_ocrneurons.cli import app

    result = CliRunner().invoke(app, ["make-sample", "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sample-dev-fr.tsv").read_bytes() == (COMMITTED / "sample-dev-fr.tsv").read_bytes()


@pytest.mark.parametrize("split,n_sent", [("train", 300), ("dev", 80), ("test", 80)])
def test_sample_content(split, n_sent):
    docs = read_hipe_tsv(sample_path(split))
    assert sample_dir() == COMMITTED
    assert format_hipe_tsv(docs).encode("utf-8") == sample_path(split).read_bytes()
    assert sum(len(d.sentence_spans()) for d in docs) == n_sent
    assert all(d.id.startswith(f"sample-{split}-") for d in docs)
    labels = Counter(lab for d in docs for _, _, lab in bio_spans([t.get("NE-COARSE-LIT") for t in d.tokens]))
    assert set(labels) == {"pers", "loc", "org", "time", "prod"}
    for d in docs:
        assert d.tokens[-1].end_of_sentence
        for prev, tok in zip(d.tokens, d.tokens[1:]):
            if tok.text in {",", "."} and not prev.end_of_sentence:
                assert prev.no_space_after, (prev.text, tok.text)
        fine = [t.get("NE-FINE-LIT") for t in d.tokens]
        coarse = [t.get("NE-COARSE-LIT") for t in d.tokens]
        assert [c[:2] for c in coarse] == [f[:2] for f in fine]


def test_generator_is_deterministic_and_seed_dependent():
    a = format_hipe_tsv(generate_documents("dev"))
    assert a == format_hipe_tsv(generate_documents("dev"))
    assert a != format_hipe_tsv(generate_documents("dev", seed=5))
    assert len(generate_documents("dev", n_sentences=25)) == 3
    with pytest.raises(ValueError, match="unknown split"):
        generate_documents("validation")


def test_sample_text_looks_french():
    docs = read_hipe_tsv(sample_path("dev"))
    text = " ".join(d.text() for d in docs)
    assert "de le " not in text and "de Alger" not in text and "l' " not in text
    assert "." in text and "," in text
