"""Tests for ``ocrneurons annotate`` (spacy_ocrneurons.archives), issue #4.

The pipelines are ``spacy.blank("fr")`` + an ``entity_ruler`` saved to disk: they do not
depend on the neural ``ocrneurons_ner`` component.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

spacy = pytest.importorskip("spacy")

from spacy_ocrneurons import archives as A  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "archives"
PATTERNS = [
    {"label": "LOC", "pattern": "Paris"},
    {"label": "LOC", "pattern": "Lyon"},
    {"label": "PER", "pattern": [{"LOWER": "washington"}]},
    {"label": "ORG", "pattern": "Banque de France"},
    {"label": "PER", "pattern": "Jean Dupont"},
    {"label": "PER", "pattern": "Victor Hugo"},
    {"label": "ORG", "pattern": "Gazette de France"},
]
SLOW_CODE = textwrap.dedent(
    """
    import os, time
    from spacy.language import Language

    @Language.component("slow_down")
    def slow_down(doc):
        time.sleep(float(os.environ.get("SLOW_DOWN_S", "0")))
        return doc
    """
)


def _save_pipeline(path, slow=False):
    nlp = spacy.blank("fr")
    ruler = nlp.add_pipe("entity_ruler")
    ruler.add_patterns(PATTERNS)
    if slow:
        nlp.add_pipe("slow_down")
    nlp.to_disk(path)
    return str(path)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return _save_pipeline(tmp_path_factory.mktemp("pipeline") / "ruler_fr")


@pytest.fixture(scope="module")
def slow_pipeline(tmp_path_factory):
    d = tmp_path_factory.mktemp("slow")
    code = d / "slow_code.py"
    code.write_text(SLOW_CODE)
    A.import_code(str(code))
    return _save_pipeline(d / "slow_fr", slow=True), str(code)


def _parse(name, **kw):
    descs = list(A.iter_descriptors(A.InputSet([str(FIXTURES / name)]), **kw))
    return [A.parse_document(d) for d in descs]


def _records(out):
    return list(A.read_records(str(out)))


def _by_id(records):
    return {r["id"]: r for r in records}


def _cli_prefix():
    """``python -m spacy_ocrneurons annotate`` (or without the command name while the CLI
    has a single command, in which case typer makes it the root command)."""
    import typer.main
    from spacy_ocrneurons.cli import app

    cmd = typer.main.get_command(app)
    sub = ["annotate"] if hasattr(cmd, "commands") else []
    return [sys.executable, "-m", "spacy_ocrneurons", *sub]


# --------------------------------------------------------------------------------------------
# Readers and Doc construction
# --------------------------------------------------------------------------------------------


def test_alto_v2_hyphenation_subs_content():
    (p,) = _parse("alto_v2.xml")
    assert p["error"] is None and p["format"] == "alto"
    assert p["text"] == "Le général Washington arrive à Paris.\nLa Banque de France ferme."
    w = {x["id"]: x for x in p["words"]}
    # the two hyphen parts map to the same, dehyphenated, span
    assert (w["S3"]["start"], w["S3"]["end"]) == (w["S4"]["start"], w["S4"]["end"])
    assert p["text"][w["S3"]["start"]:w["S3"]["end"]] == "Washington"
    assert w["S3"]["box"] == [320, 100, 110, 50] and w["S4"]["box"] == [100, 160, 140, 50]
    assert w["S3"]["hyphen"] == "part1" and w["S4"]["hyphen"] == "part2"
    assert w["S4"]["conf"] == pytest.approx(0.70)
    # "Paris" and "." are two Strings without SP between them: no space
    assert p["text"][w["S7"]["start"]:w["S8"]["end"]] == "Paris."
    assert p["info"]["units"] == "pixel"


def test_alto_v3_reading_order_and_hyp_element():
    (p,) = _parse("alto_v3.xml")
    # ReadingOrder puts B_second before B_first; HYP without SUBS_CONTENT joins the parts
    assert p["text"] == "Chronique de Paris\nMonsieur Jean Dupont de Lyon"
    w = {x["id"]: x for x in p["words"]}
    assert p["text"][w["w3"]["start"]:w["w3"]["end"]] == "Dupont"
    assert w["w4"]["start"] == w["w3"]["start"]


def test_alto_v4_without_sp_float_coords_composed_block():
    (p,) = _parse("alto_v4.xml")
    # no SP elements at all: words separated by spaces; unmatched HypPart1 kept as written
    assert p["text"] == "Lettre de Lyon, Banque\nNapoléon écrit"
    w = p["words"]
    assert w[0]["id"] == "w1" and w[0]["box"] == [10.5, 20, 60, 12.25]
    assert w[0]["page"] == "p1" and p["info"]["units"] == "mm10"


def test_page_reading_order_words_polygons():
    (p,) = _parse("page.xml")
    assert p["format"] == "page"
    assert p["text"] == "Gazette de France\nVictor Hugo quitte Paris pour Lyon."
    w = {x["id"]: x for x in p["words"]}
    # TextEquiv with the lowest index wins
    assert w["wt1"]["text"] == "Gazette" and w["wt1"]["conf"] == pytest.approx(0.99)
    assert w["wb2"]["polygon"] == [[210, 300], [300, 302], [300, 352], [210, 350]]
    assert w["wb2"]["box"] == [210, 300, 90, 52]
    # a line without Word elements: the line is the source unit
    lyon = [x for x in p["words"] if x["id"] == "l_body2"]
    assert [x["granularity"] for x in lyon] == ["line", "line"]
    assert p["text"][lyon[1]["start"]:lyon[1]["end"]] == "Lyon."


def test_errors_are_reported_not_raised():
    (p,) = _parse("malformed.xml")
    assert p["error"]["type"] == "malformed_xml"
    (p,) = _parse("latin1.txt")
    assert p["error"]["type"] == "undecodable"
    (p,) = _parse("empty.txt")
    assert p["error"]["type"] == "empty_text"
    ps = _parse("docs.jsonl")
    assert [x["key"] for x in ps] == ["docs.jsonl:1", "docs.jsonl:2", "docs.jsonl:4", "docs.jsonl:5", "docs.jsonl:6"]
    assert [x["id"] for x in ps] == ["doc-a", "docs.jsonl:2", "docs.jsonl:4", "doc-d", "42"]
    assert ps[0]["metadata"] == {"date": "1871-03-18", "source": "Le Petit Journal"}
    assert ps[2]["error"]["type"] == "invalid_json"
    assert ps[3]["error"]["type"] == "missing_text"
    # a non-UTF-8 file decodes with the right --encoding
    (p,) = [A.parse_document(d, encoding="latin-1") for d in A.iter_descriptors(A.InputSet([str(FIXTURES / "latin1.txt")]))]
    assert p["error"] is None and p["text"].startswith("Café de Paris")


def test_safe_xml_no_external_entities_and_bounded_size(tmp_path):
    (p,) = _parse("xxe.xml")
    assert p["error"] is not None
    assert "root:" not in json.dumps(p)  # /etc/passwd never read
    big = tmp_path / "big.xml"
    shutil.copy(FIXTURES / "alto_v2.xml", big)
    (d,) = A.iter_descriptors(A.InputSet([str(big)]))
    assert A.parse_document(d, max_bytes=100)["error"]["type"] == "too_large"
    # oversized JSONL line
    jl = tmp_path / "x.jsonl"
    jl.write_text('{"text": "' + "a" * 500 + '"}\n{"text": "Paris"}\n')
    ds = list(A.iter_descriptors(A.InputSet([str(jl)]), max_bytes=100))
    assert [A.parse_document(d, max_bytes=100)["error"] for d in ds][1] is None
    assert ds[0]["error"].startswith("too_large")


def test_input_discovery_and_errors(tmp_path):
    with pytest.raises(A.ArchiveError, match="nope"):
        A.InputSet([str(tmp_path / "nope")])
    with pytest.raises(A.ArchiveError, match=r"\*\.zzz"):
        A.InputSet([str(tmp_path / "*.zzz")])
    inp = A.InputSet([str(FIXTURES)])
    rels = [r for _p, r in inp]
    assert rels == sorted(rels) and "alto_v2.xml" in rels
    # glob + a file: paths relative to the common root, no duplicates
    inp = A.InputSet([str(FIXTURES / "alto_*.xml"), str(FIXTURES / "alto_v2.xml")])
    assert [r for _p, r in inp] == ["alto_v2.xml", "alto_v3.xml", "alto_v4.xml"]
    assert A.sniff_format("x.xml", b"<?xml version='1.0'?><PcGts xmlns='x'>") == "page"
    assert A.sniff_format("x.dat", b'{"text": 1}') == "jsonl"


def test_make_doc_source_words(pipeline):
    nlp = spacy.load(pipeline)
    (p,) = _parse("alto_v4.xml")
    doc = nlp(A.make_doc(nlp, p))
    lyon = [e for e in doc.ents if e.text == "Lyon"][0]
    words = A.source_words(doc, lyon.start_char, lyon.end_char)
    assert [w["text"] for w in words] == ["Lyon,"]  # tokenizer split the comma off the source word


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------

EXPECTED_KEYS = {
    "alto_v2.xml", "alto_v3.xml", "alto_v4.xml", "page.xml", "malformed.xml", "xxe.xml", "latin1.txt",
    "empty.txt", "plain.txt", "docs.jsonl:1", "docs.jsonl:2", "docs.jsonl:4", "docs.jsonl:5", "docs.jsonl:6",
}


def test_annotate_records_offsets_words_boxes(pipeline, tmp_path):
    out = tmp_path / "out"
    s = A.annotate_archives([str(FIXTURES)], pipeline, str(out), output_formats=["jsonl"], progress=False,
                            include_text=True, shard_size=4)
    recs = _records(out)
    assert sorted(r["key"] for r in recs) == sorted(EXPECTED_KEYS)  # exactly one record each
    assert s["done"] == 8 and s["failed"] == 6 and s["skipped"] == 0 and s["shards"] == 4
    assert json.loads((out / "summary.json").read_text())["failed"] == 6
    by = {r["key"]: r for r in recs}
    for r in recs:
        for e in r["entities"]:
            assert r["text"][e["start"]:e["end"]] == e["text"]
    v2 = by["alto_v2.xml"]
    ents = {e["text"]: e for e in v2["entities"]}
    assert set(ents) == {"Washington", "Paris", "Banque de France"}
    wash = ents["Washington"]
    assert wash["label"] == "PER" and wash["confidence"] is None
    assert [w["id"] for w in wash["words"]] == ["S3", "S4"]
    assert [w["box"] for w in wash["words"]] == [[320, 100, 110, 50], [100, 160, 140, 50]]
    assert wash["box"] == [100, 100, 330, 110] and wash["ocr_confidence"] == pytest.approx(0.75)
    assert [w["id"] for w in ents["Banque de France"]["words"]] == ["S10", "S11", "S12"]
    assert ents["Paris"]["words"][0]["id"] == "S7"
    v3 = {e["text"]: e for e in by["alto_v3.xml"]["entities"]}
    assert [w["id"] for w in v3["Jean Dupont"]["words"]] == ["w2", "w3", "w4"]
    pg = {e["text"]: e for e in by["page.xml"]["entities"]}
    assert [w["id"] for w in pg["Victor Hugo"]["words"]] == ["wb1", "wb2"]
    assert pg["Victor Hugo"]["box"] == [100, 300, 200, 52]
    assert pg["Victor Hugo"]["words"][1]["polygon"][1] == [300, 302]
    assert pg["Lyon"]["words"][0]["id"] == "l_body2"
    assert [e["label"] for e in by["page.xml"]["entities"]] == ["ORG", "PER", "LOC", "LOC"]
    # errors become records with a reason
    assert by["malformed.xml"]["status"] == "error" and by["malformed.xml"]["error"]["type"] == "malformed_xml"
    assert by["latin1.txt"]["error"]["type"] == "undecodable"
    assert by["empty.txt"]["error"]["type"] == "empty_text"
    assert by["docs.jsonl:4"]["error"]["type"] == "invalid_json"
    assert by["docs.jsonl:1"]["id"] == "doc-a" and by["docs.jsonl:1"]["metadata"]["date"] == "1871-03-18"
    assert by["plain.txt"]["format"] == "text" and "words" not in by["plain.txt"]["entities"][0]
    assert v2["pipeline"] == "fr_pipeline" and "model" in v2 and "profile" in v2


def test_outputs_agree_jsonl_docbin_hipe(pipeline, tmp_path):
    out = tmp_path / "out"
    A.annotate_archives([str(FIXTURES)], pipeline, str(out), output_formats=["jsonl", "docbin", "hipe"],
                        progress=False, shard_size=5)
    recs = _records(out)
    docs = list(A.read_docs(str(out)))
    hipe = list(A.read_hipe(str(out)))
    ok = [r for r in recs if r["status"] == "ok"]
    assert len(docs) == len(ok) and len(hipe) == len(recs)
    for r, doc in zip(ok, docs):
        assert doc.user_data[A.USER_DATA_KEY]["key"] == r["key"]
        assert [(e.start_char, e.end_char, e.label_) for e in doc.ents] == [
            (e["start"], e["end"], e["label"]) for e in r["entities"]]
        for e, ent in zip(r["entities"], doc.ents):
            got = A.source_words(doc, ent.start_char, ent.end_char)
            assert [w["id"] for w in got] == [w["id"] for w in e.get("words", [])]
    for r, h in zip(recs, hipe):
        assert h["id"] == r["id"] and h["status"] == r["status"]
        assert A.hipe_entities(h["tokens"]) == [(e["label"], e["text"]) for e in r["entities"]]


def test_deterministic_and_n_process(pipeline, tmp_path):
    outs = []
    for i, n in enumerate([1, 1, 2]):
        out = tmp_path / f"out{i}"
        A.annotate_archives([str(FIXTURES)], pipeline, str(out), output_formats=["jsonl", "hipe", "docbin"],
                            progress=False, shard_size=3, batch_size=2, n_process=n)
        outs.append(out)
    names = sorted(n for n in os.listdir(outs[0]) if n.startswith(("records-", "hipe-", "docs-")))
    assert len(names) == 15
    for out in outs[1:]:
        assert sorted(n for n in os.listdir(out) if n.startswith(("records-", "hipe-", "docs-"))) == names
        for n in names:
            assert (out / n).read_bytes() == (outs[0] / n).read_bytes(), n
    assert (outs[0] / "manifest.jsonl").read_bytes() == (outs[2] / "manifest.jsonl").read_bytes()


def test_resume_and_output_folder_guards(pipeline, tmp_path):
    out = tmp_path / "out"
    A.annotate_archives([str(FIXTURES)], pipeline, str(out), progress=False, shard_size=4)
    with pytest.raises(A.ArchiveError, match="--resume"):
        A.annotate_archives([str(FIXTURES)], pipeline, str(out), progress=False)
    s = A.annotate_archives([str(FIXTURES)], pipeline, str(out), progress=False, resume=True)
    assert (s["done"], s["failed"], s["skipped"]) == (0, 0, 14)
    assert s["total_done"] == 8 and s["total_failed"] == 6
    with pytest.raises(A.ArchiveError, match="formats"):
        A.annotate_archives([str(FIXTURES)], pipeline, str(out), progress=False, resume=True,
                            output_formats=["hipe"])
    # a torn manifest line and leftovers of an uncommitted shard are cleaned up on resume
    lines = (out / "manifest.jsonl").read_bytes().splitlines(keepends=True)
    (out / "manifest.jsonl").write_bytes(b"".join(lines[:2]) + lines[2][:20])
    (out / ".records-00002.jsonl.tmp").write_text("garbage")
    s = A.annotate_archives([str(FIXTURES)], pipeline, str(out), progress=False, resume=True, shard_size=4)
    assert s["skipped"] == 8 and s["done"] + s["failed"] == 6
    keys = [r["key"] for r in _records(out)]
    assert sorted(keys) == sorted(EXPECTED_KEYS)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    s = A.annotate_archives([str(FIXTURES)], pipeline, str(out), progress=False, overwrite=True)
    assert s["done"] == 8 and len(_records(out)) == 14


def test_pipeline_error_isolated_to_one_document(tmp_path):
    code = tmp_path / "boom.py"
    code.write_text(textwrap.dedent(
        """
        from spacy.language import Language

        @Language.component("boom_on_lyon")
        def boom_on_lyon(doc):
            if "Lyon" in doc.text:
                raise ValueError("boom")
            return doc
        """))
    A.import_code(str(code))
    nlp = spacy.blank("fr")
    nlp.add_pipe("entity_ruler").add_patterns(PATTERNS)
    nlp.add_pipe("boom_on_lyon")
    nlp.to_disk(tmp_path / "p")
    out = tmp_path / "out"
    s = A.annotate_archives([str(FIXTURES / "alto_v2.xml"), str(FIXTURES / "alto_v3.xml")], str(tmp_path / "p"),
                            str(out), progress=False, code=str(code))
    by = _by_id(_records(out))
    assert by["alto_v2.xml"]["status"] == "ok"
    assert by["alto_v3.xml"]["error"]["type"] == "pipeline_error" and "boom" in by["alto_v3.xml"]["error"]["message"]
    assert s["done"] == 1 and s["failed"] == 1


def test_confidence_and_model_ids_from_component(tmp_path):
    """Run in a subprocess: registers a Span extension and a fake component named ocrneurons_ner."""
    script = textwrap.dedent(
        """
        import json, spacy
        from spacy.language import Language
        from spacy.tokens import Span
        from spacy_ocrneurons import archives as A

        if not Span.has_extension("confidence"):
            Span.set_extension("confidence", default=None)

        class Fake:
            def __init__(self):
                self.cfg = {"model": "mistral-7b-lora", "adapter": "a", "profile": "profile-x", "factor": 0.0}
            def __call__(self, doc):
                doc.ents = [doc.char_span(0, 5, label="LOC")]
                doc.ents[0]._.confidence = 0.875
                return doc

        @Language.factory("fake_ocr_ner")
        def make_fake(nlp, name):
            return Fake()

        nlp = spacy.blank("fr")
        nlp.add_pipe("fake_ocr_ner", name="ocrneurons_ner")
        p = {"key": "k", "id": "k", "source": "s", "line": None, "format": "text", "metadata": None,
              "text": "Paris est belle", "words": None, "info": {}, "error": None}
        (r,) = A.annotate_parsed(nlp, [p])
        print(r["record"])
        """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    assert rec["model"] == "mistral-7b-lora" and rec["profile"] == "profile-x"
    assert rec["entities"][0]["confidence"] == pytest.approx(0.875)


# --------------------------------------------------------------------------------------------
# CLI, kill -9 and resume
# --------------------------------------------------------------------------------------------


def test_cli_annotate_and_errors(pipeline, tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(_cli_prefix() + [str(FIXTURES / "*.xml"), "--pipeline", pipeline, "--output", str(out),
                                          "-t", "jsonl,hipe", "--no-progress"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "6 documents: 4 done, 2 failed, 0 skipped" in res.stderr
    assert (out / "hipe-00000.tsv").exists()
    res = subprocess.run(_cli_prefix() + [str(tmp_path / "missing_folder"), "--pipeline", pipeline,
                                          "--output", str(tmp_path / "o2")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "missing_folder" in res.stderr


def _make_corpus(root: Path, n_jsonl=60):
    root.mkdir()
    with open(root / "a.jsonl", "w") as f:
        for i in range(n_jsonl):
            f.write(json.dumps({"id": f"j{i}", "text": f"Lettre {i} de Jean Dupont à Paris, Banque de France."}) + "\n")
    for name in ("alto_v2.xml", "alto_v3.xml", "page.xml", "malformed.xml", "empty.txt"):
        shutil.copy(FIXTURES / name, root / name)
    return n_jsonl + 5


def test_kill9_midway_then_resume_each_document_once(slow_pipeline, tmp_path):
    pipe, code = slow_pipeline
    corpus = tmp_path / "corpus"
    n = _make_corpus(corpus)
    out = tmp_path / "out"
    args = [str(corpus), "--pipeline", pipe, "--code", code, "--output", str(out), "-t", "jsonl,hipe,docbin",
            "--shard-size", "5", "--batch-size", "2", "--no-progress"]
    env = dict(os.environ, SLOW_DOWN_S="0.1")
    proc = subprocess.Popen(_cli_prefix() + args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "manifest.jsonl"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if manifest.exists() and len(manifest.read_bytes().splitlines()) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the job finished before it could be killed: " + proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "summary.json").exists()
    committed = [json.loads(x) for x in manifest.read_bytes().splitlines() if x.strip()]
    assert 2 <= len(committed) < 14
    res = subprocess.run(_cli_prefix() + args + ["--resume"], env=dict(env, SLOW_DOWN_S="0"),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] >= 10 and summary["skipped"] + summary["done"] + summary["failed"] == n
    keys = [r["key"] for r in _records(out)]
    assert len(keys) == len(set(keys)) == n
    # every shard file on disk is listed in the manifest, and all formats agree
    listed = {f for e in A.read_manifest(str(out))[0] for f in e["files"]}
    on_disk = {x for x in os.listdir(out) if A._SHARD_RE.match(x)}
    assert listed == on_disk
    assert len(list(A.read_docs(str(out)))) == sum(1 for r in _records(out) if r["status"] == "ok")
    assert [h["id"] for h in A.read_hipe(str(out))] == [r["id"] for r in _records(out)]
    # same records as an uninterrupted run
    clean = tmp_path / "clean"
    A.annotate_archives([str(corpus)], pipe, str(clean), code=code, progress=False, shard_size=5)
    strip = lambda rs: sorted(json.dumps(r, sort_keys=True) for r in rs)  # noqa: E731
    assert strip(_records(out)) == strip(_records(clean))
