"""End to end: `annotate` with a pipeline assembled around the real ocrneurons_ner component."""
import json

from spacy_ocrneurons.archives import annotate_archives, read_records
from spacy_ocrneurons.workflow import assemble_pipeline

from .conftest import save_tiny_checkpoint
from .test_component import _bias_for

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures" / "archives"


def test_annotate_alto_with_ocrneurons_ner_maps_entities_to_source_words(tmp_path, tokenizer, labels):
    base = tmp_path / "base"
    save_tiny_checkpoint(base, "llama", tokenizer, labels, head_bias=_bias_for(labels, "B-loc"))
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"format": "spacy-ocrneurons/profile", "version": 1, "site": "mlp.up_proj",
                                   "factor": 0.5, "neurons": {"0": [1, 2]}, "model": {}, "provenance": {}}))
    pipe_dir = assemble_pipeline(tmp_path / "pipeline", base, profile=profile, include_base=True)
    out = tmp_path / "out"
    summary = annotate_archives([str(FIXTURES / "alto_v3.xml"), str(FIXTURES / "malformed.xml")], str(pipe_dir),
                                str(out), progress=False)
    records = {r["source"].split("/")[-1]: r for r in read_records(str(out))}
    assert summary["done"] == 1 and summary["failed"] == 1
    assert records["malformed.xml"]["status"] == "error"
    alto = records["alto_v3.xml"]
    assert alto["status"] == "ok"
    assert alto["profile"] and "profile.json" in str(alto["profile"])
    ents = alto["entities"]
    # every word-like token is its own loc entity, with confidence, source words and boxes
    assert ents and all(e["label"] == "loc" for e in ents)
    for e in ents:
        assert 0.9 < e["confidence"] <= 1.0
        assert e["words"], e
        assert all(len(w["box"]) == 4 for w in e["words"])
        assert any(e["text"] in w["text"] or w["text"] in e["text"] for w in e["words"]), e
