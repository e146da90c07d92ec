"""OCR-like noise: typed distortions, label re-alignment, nlpaug levels, error rates."""
import json
import random
from pathlib import Path

import pytest

from spacy_ocrneurons.hipe import bio_spans, read_hipe_tsv
from spacy_ocrneurons.noise import (
    LEVELS,
    ErrorCounts,
    NoiseConfig,
    _levenshtein_dp,
    _noise_typed,
    error_rates,
    levenshtein,
    noise_file,
    noise_hipe_docs,
    noise_sentence,
    realign_tags,
)

FIXTURE = Path(__file__).parent / "fixtures" / "hipe" / "mini-fr.tsv"
WORDS = "M. Théodore Dupont , député de la Savoie , a quitté Paris le 12 janvier 1908 pour Lyon .".split()
TAGS = ["B-pers", "I-pers", "I-pers", "O", "O", "O", "O", "B-loc", "O", "O", "O", "B-loc", "B-time", "I-time",
        "I-time", "I-time", "O", "B-loc", "O"]


# ---- label re-alignment -------------------------------------------------------------------------------


def test_realign_split_inside_entity():
    # "Théodore" (I-pers) split into two tokens; "Savoie" (B-loc, one token) split too
    tags, merged = realign_tags(["B-pers", "I-pers", "O", "B-loc"], [[0], [1], [1], [2], [3], [3]])
    assert tags == ["B-pers", "I-pers", "I-pers", "O", "B-loc", "I-loc"] and merged == 0


def test_realign_merge_of_o_and_entity_keeps_entity():
    tags, merged = realign_tags(["O", "B-loc", "O"], [[0, 1], [2]])
    assert tags == ["B-loc", "O"] and merged == 0


def test_realign_merge_across_entity_boundary_takes_first_entity():
    # "Paris" (B-loc) + "le" (B-time) merged: the token is loc; the time entity goes on with its other tokens
    tags, merged = realign_tags(["B-loc", "B-time", "I-time"], [[0, 1], [2]])
    assert tags == ["B-loc", "B-time"] and merged == 0
    # two one-token entities in one token: the second is absorbed (the only way the count can drop)
    tags, merged = realign_tags(["B-loc", "B-loc", "O"], [[0, 1], [2]])
    assert tags == ["B-loc", "O"] and merged == 1
    # the end of an entity merged with an O token stays inside the entity
    tags, _ = realign_tags(["B-pers", "I-pers", "O"], [[0], [1, 2]])
    assert tags == ["B-pers", "I-pers"]


def test_realign_keeps_source_spelling_of_continued_entity():
    # a sentence that starts inside an entity continued from the previous sentence keeps its I-
    tags, _ = realign_tags(["I-org", "O"], [[0], [0], [1]])
    assert tags == ["I-org", "I-org", "O"]
    assert realign_tags(["_", "B-x"], [[0], [1]])[0] == ["_", "B-x"]


def test_deleting_a_one_char_token_keeps_it():
    cfg = NoiseConfig(delete_p=1.0)
    words, spaces, alignment = _noise_typed(["M", ".", "X", "ab"], [False, True, True, True], cfg, random.Random(0))
    assert len(words) == 4 and all(len(w) == 1 for w in words) and words[:3] == ["M", ".", "X"]
    sent = noise_sentence(["A", "B"], ["B-pers", "B-loc"], method="typed", config=cfg, seed=1)
    assert sent.tags == ["B-pers", "B-loc"]


def test_split_and_merge_everything():
    split_all = noise_sentence(WORDS, TAGS, method="typed", config=NoiseConfig(split_p=1.0), seed=0)
    assert len(split_all.words) == len(WORDS) + sum(len(w) >= 2 for w in WORDS)
    assert "".join(split_all.words) == "".join(WORDS)
    assert len(bio_spans(split_all.tags)) == len(bio_spans(TAGS))
    merge_all = noise_sentence(WORDS, TAGS, method="typed", config=NoiseConfig(merge_p=1.0), seed=0)
    assert merge_all.words == ["".join(WORDS)] and merge_all.alignment == [list(range(len(WORDS)))]
    assert merge_all.tags == ["B-pers"]
    assert merge_all.merged_entities == len(bio_spans(TAGS)) - 1
    # merges never cross "no_merge_before" barriers
    barred = noise_sentence(WORDS, TAGS, method="typed", config=NoiseConfig(merge_p=1.0), seed=0, no_merge_before=[9])
    assert len(barred.words) == 2 and barred.alignment[1][0] == 9


def test_spaces_follow_the_text():
    sent = noise_sentence(["Paris", ",", "le"], ["B-loc", "O", "O"], [False, True, True], method="typed",
                          config=NoiseConfig(merge_p=1.0), seed=0)
    # no space between "Paris" and ",": nothing to merge there; the space after "," is lost
    assert sent.words == ["Paris", ",le"] and sent.spaces == [False, True]


@pytest.mark.parametrize("level", LEVELS)
def test_entities_never_dropped_by_typed_noise(level):
    rng = random.Random(7)
    for n in range(200):
        sent = noise_sentence(WORDS, TAGS, method="typed", level=level, rng=rng)
        assert all(sent.words)
        assert len(bio_spans(sent.tags)) == len(bio_spans(TAGS)) - sent.merged_entities
        # each noisy token comes from contiguous original tokens, in order, covering everything
        flat = [i for src in sent.alignment for i in src]
        assert sorted(set(flat)) == list(range(len(WORDS))) and flat == sorted(flat)


def test_each_typed_distortion_does_something():
    text = ["fifille", "œuvre", "façade", "église", "modern", "clos", "Oslo", "assis"] * 5
    for field, check in [
        ("diacritic_p", lambda w: any(c in "".join(w) for c in "ae") and "ç" not in "".join(w)),
        ("long_s_p", lambda w: "ſ" in "".join(w)),
        ("ligature_p", lambda w: "ﬁ" in "".join(w) and "oeuvre" in w),
        ("confusion_p", lambda w: "modem" in w or "0slo" in w or "dos" in w),
    ]:
        sent = noise_sentence(text, method="typed", config=NoiseConfig(**{field: 1.0}), seed=3)
        assert len(sent.words) == len(text) and check(sent.words), (field, sent.words)
    ins = noise_sentence(["abc"], method="typed", config=NoiseConfig(insert_p=1.0), seed=0)
    assert len(ins.words[0]) == 6
    assert noise_sentence(text, method="typed", config=NoiseConfig(), seed=0).words == text
    with pytest.raises(ValueError, match="diacritic_p"):
        NoiseConfig(diacritic_p=1.5)


def test_presets():
    assert NoiseConfig.preset("low").split_p < NoiseConfig.preset("high").split_p
    with pytest.raises(ValueError, match="unknown noise level"):
        NoiseConfig.preset("extreme")


# ---- determinism ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["typed", "nlpaug"])
def test_seeded_and_order_independent(method):
    a = noise_sentence(WORDS, TAGS, method=method, level="high", seed=42)
    random.seed(123)  # global state must not matter
    noise_sentence(WORDS, TAGS, method=method, level="high", seed=7)
    b = noise_sentence(WORDS, TAGS, method=method, level="high", seed=42)
    assert a == b
    c = noise_sentence(WORDS, TAGS, method=method, level="high", seed=43)
    assert c.words != a.words
    state = random.getstate()
    noise_sentence(WORDS, TAGS, method=method, level="high", seed=1)
    assert random.getstate() == state  # global RNG left untouched


def test_nlpaug_keeps_tokens_and_levels_increase():
    clean = [w for words, _, _ in _fixture_sentences() for w in words] + WORDS * 3
    cers = []
    for level in LEVELS:
        counts = ErrorCounts()
        for s in range(6):
            sent = noise_sentence(clean, method="nlpaug", level=level, seed=s)
            assert len(sent.words) == len(clean) and sent.alignment == [[i] for i in range(len(clean))]
            counts.add(clean, sent.words)
        cers.append(counts.cer)
    assert 0 < cers[0] < cers[1] < cers[2], cers


def _fixture_sentences():
    from spacy_ocrneurons.hipe import iter_sentences

    return list(iter_sentences(read_hipe_tsv(FIXTURE)))


# ---- error rates ----------------------------------------------------------------------------------


def test_error_rates():
    assert error_rates(["le", "chat"], ["le", "chat"]) == (0.0, 0.0)
    # "le chat noir" (12 chars) -> "1e chat nor": 1 substitution + 1 deletion; 2 of 3 words wrong
    cer, wer = error_rates(["le", "chat", "noir"], ["1e", "chat", "nor"])
    assert cer == pytest.approx(2 / 12) and wer == pytest.approx(2 / 3)
    # a merge: one word instead of two -> 1 substitution + 1 deletion at word level, 1 char deleted
    cer, wer = error_rates(["de", "Paris"], ["deParis"])
    assert cer == pytest.approx(1 / 8) and wer == pytest.approx(1.0)
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3


def test_levenshtein_matches_dynamic_programming():
    rng = random.Random(5)
    for _ in range(300):
        a = "".join(rng.choice("abcé ") for _ in range(rng.randrange(0, 70)))
        b = "".join(rng.choice("abcd ") for _ in range(rng.randrange(0, 70)))
        assert levenshtein(a, b) == _levenshtein_dp(a, b)
        assert levenshtein(a.split(), b.split()) == _levenshtein_dp(a.split(), b.split())


# ---- documents and files --------------------------------------------------------------------------


def test_noise_hipe_docs_keeps_layout_and_entities(tmp_path):
    docs = read_hipe_tsv(FIXTURE)
    cfg = NoiseConfig(split_p=0.5, merge_p=0.5, confusion_p=0.5)
    noisy = noise_hipe_docs(docs, method="typed", config=cfg, seed=3)
    again = noise_hipe_docs(docs, method="typed", config=cfg, seed=3)
    assert [[t.text for t in d.tokens] for d in noisy] == [[t.text for t in d.tokens] for d in again]
    for clean, dirty in zip(docs, noisy):
        assert dirty.comments == clean.comments
        assert len(dirty.meta["alignment"]) == len(dirty.tokens)
        tags = [t.get("NE-COARSE-LIT") for t in clean.tokens]
        new = [t.get("NE-COARSE-LIT") for t in dirty.tokens]
        n_sent = sum(t.end_of_sentence for t in clean.tokens)
        assert sum(t.end_of_sentence for t in dirty.tokens) == n_sent  # sentences are never merged
        assert len(bio_spans(new)) <= len(bio_spans(tags))
    # the segment comment is still before the first token of its segment
    first = noisy[0]
    (pos,) = list(first.inner_lines)
    assert first.meta["alignment"][pos][0] == 11
    out = tmp_path / "noisy.tsv"
    from spacy_ocrneurons.hipe import write_hipe_tsv

    write_hipe_tsv(noisy, out)
    assert [len(d.tokens) for d in read_hipe_tsv(out)] == [len(d.tokens) for d in noisy]


@pytest.mark.parametrize("method", ["typed", "nlpaug"])
def test_noise_file_tsv_and_docbin(tmp_path, method):
    from spacy_ocrneurons.hipe import convert_docbin_to_hipe, convert_hipe_to_docbin, read_docbin

    report = noise_file(FIXTURE, tmp_path / "n.tsv", method=method, level="high", seed=1)
    assert report["cer"] > 0 and report["words"] == 24 and json.dumps(report)
    spacy_in = tmp_path / "in.spacy"
    convert_hipe_to_docbin(FIXTURE, spacy_in, split="sentence")
    report2 = noise_file(spacy_in, tmp_path / "n.spacy", method=method, level="high", seed=1)
    assert report2["words"] == 24
    clean, noisy = read_docbin(spacy_in), read_docbin(tmp_path / "n.spacy")
    assert len(clean) == len(noisy)
    for c, n in zip(clean, noisy):
        assert len(n.user_data["ocrnoise_alignment"]) == len(n)
        assert len(n.ents) <= len(c.ents)
    # the noisy DocBin still converts to a HIPE file with the original comments
    convert_docbin_to_hipe(tmp_path / "n.spacy", tmp_path / "n2.tsv")
    back = read_hipe_tsv(tmp_path / "n2.tsv")
    assert [d.comments for d in back] == [d.comments for d in read_hipe_tsv(FIXTURE)]


def test_noise_cli_writes_report(tmp_path):
    from typer.testing import CliRunner

    from spacy_ocrneurons.cli import app

    runner = CliRunner()
    out, report = tmp_path / "n.tsv", tmp_path / "metrics" / "noise.json"
    result = runner.invoke(app, ["noise", str(FIXTURE), str(out), "--method", "typed", "--level", "low",
                                 "--split-p", "1.0", "--report", str(report), "--no-progress"])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text(encoding="utf-8"))
    assert data["config"]["split_p"] == 1.0 and data["wer"] > 0.5 and data["method"] == "typed"
    assert sum(len(d.tokens) for d in read_hipe_tsv(out)) > 24
    bad = runner.invoke(app, ["noise", str(FIXTURE), str(out), "--method", "nlpaug", "--merge-p", "0.5"])
    assert bad.exit_code == 1 and "only applies to --method typed" in bad.output
    missing = runner.invoke(app, ["noise", str(tmp_path / "nope.tsv"), str(out)])
    assert missing.exit_code == 1 and "not found" in missing.output


def test_noise_docbin_plain_docs(tmp_path):
    from spacy.tokens import Doc, DocBin, Span
    from spacy.vocab import Vocab

    from spacy_ocrneurons.hipe import read_docbin
    from spacy_ocrneurons.noise import noise_docbin

    vocab = Vocab()
    doc = Doc(vocab, words=WORDS, sent_starts=[i in (0, 9) for i in range(len(WORDS))])
    doc.ents = [Span(doc, s, e, label=lab) for s, e, lab in bio_spans(TAGS)]
    DocBin(docs=[doc], store_user_data=True).to_disk(tmp_path / "plain.spacy")
    counts = noise_docbin(tmp_path / "plain.spacy", tmp_path / "noisy.spacy", method="typed",
                          config=NoiseConfig(merge_p=1.0), seed=0)
    (noisy,) = read_docbin(tmp_path / "noisy.spacy")
    # one merged token per sentence (merges never cross the sentence start at token 9)
    assert [t.text for t in noisy] == ["".join(WORDS[:9]), "".join(WORDS[9:])]
    # (msgpack gives tuples back from a DocBin)
    assert [list(a) for a in noisy.user_data["ocrnoise_alignment"]] == [list(range(9)), list(range(9, len(WORDS)))]
    assert [e.label_ for e in noisy.ents] == ["pers", "loc"] and counts.wer == 1.0
