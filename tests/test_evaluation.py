"""Evaluation: strict seqeval scoring, cached tagging, the dev sweep with selection on dev only, and the outputs."""
import json
import random

import pytest

from spacy_ocrneurons import evaluation as ev
from spacy_ocrneurons import hipe

TYPES = ["loc", "pers"]

# (words, tags) sentences written for these tests; the noisy ones carry OCR-like errors
DEV_CLEAN = [
    ("M. Jean Dupont est arrivé à Paris hier soir .".split(), ["B-pers", "I-pers", "I-pers"] + ["O"] * 3 + ["B-loc"] + ["O"] * 3),
    ("La ville de Lyon fête le maire Augagneur .".split(), ["O", "O", "O", "B-loc", "O", "O", "O", "B-pers", "O"]),
    ("On annonce de Genève la mort de Mme Dupont .".split(), ["O", "O", "O", "B-loc", "O", "O", "O", "B-pers", "I-pers", "O"]),
]
DEV_MEDIUM = [
    ("M. Jcan Dupout est arrivé à Pari5 hier soir .".split(), ["B-pers", "I-pers", "I-pers"] + ["O"] * 3 + ["B-loc"] + ["O"] * 3),
    ("La vi1le de Lyou fête le maire Augaguear .".split(), ["O", "O", "O", "B-loc", "O", "O", "O", "B-pers", "O"]),
]
TEST_CLEAN = [
    ("Le roi Édouard est arrivé à Marseille .".split(), ["O", "O", "B-pers", "O", "O", "O", "B-loc", "O"]),
    ("M. Henri Poincaré quitte Paris pour Genève .".split(), ["B-pers", "I-pers", "I-pers", "O", "B-loc", "O", "B-loc", "O"]),
    ("La Savoie attend le député Reinach .".split(), ["O", "B-loc", "O", "O", "O", "B-pers", "O"]),
]
TEST_MEDIUM = [
    ("Le roi Edonard est arrivé à Marsei1le .".split(), ["O", "O", "B-pers", "O", "O", "O", "B-loc", "O"]),
    ("M. Heuri Poincaré quitte Paris pour Gcnève .".split(), ["B-pers", "I-pers", "I-pers", "O", "B-loc", "O", "B-loc", "O"]),
]
ALL_SENTENCES = DEV_CLEAN + DEV_MEDIUM + TEST_CLEAN + TEST_MEDIUM


def write_tsv(path, sentences, sents_per_doc=2):
    """Write sentences as a HIPE TSV (documents of ``sents_per_doc`` sentences, NoSpaceAfter before '.')."""
    docs = []
    for d in range(0, len(sentences), sents_per_doc):
        hdoc = hipe.HipeDocument(comments=[f"# hipe2022:document_id = doc-{d}", "# hipe2022:language = fr"])
        for words, tags in sentences[d:d + sents_per_doc]:
            assert len(words) == len(tags)
            for i, (w, t) in enumerate(zip(words, tags)):
                misc = []
                if i + 1 < len(words) and words[i + 1] == ".":
                    misc.append("NoSpaceAfter")
                if i == len(words) - 1:
                    misc.append("EndOfSentence")
                values = {c: "O" for c in hipe.BIO_COLUMNS}
                values.update({"NE-COARSE-LIT": t, "NEL-LIT": "_", "NEL-METO": "_", "MISC": "|".join(misc) or "_"})
                hdoc.tokens.append(hipe.HipeToken(w, values))
        docs.append(hdoc)
    hipe.write_hipe_tsv(docs, path)
    return path


def relabel_tsv(path, tags_per_doc):
    """Replace the NE-COARSE-LIT column of a HIPE TSV with the given tags (one list per document)."""
    docs = hipe.read_hipe_tsv(path)
    assert len(docs) == len(tags_per_doc)
    for hdoc, tags in zip(docs, tags_per_doc):
        assert len(hdoc.tokens) == len(tags)
        for tok, tag in zip(hdoc.tokens, tags):
            tok.values["NE-COARSE-LIT"] = tag
    hipe.write_hipe_tsv(docs, path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama token classifier saved as a checkpoint with labels.json."""
    import torch

    from spacy_ocrneurons.alignment import label_list
    from spacy_ocrneurons.base_model import build_token_classifier, train_bpe_tokenizer
    from spacy_ocrneurons.modeling import save_label_map

    texts = [" ".join(w) for w, _ in ALL_SENTENCES]
    tok = train_bpe_tokenizer(texts * 3, vocab_size=200)
    labels = label_list(TYPES)
    model = build_token_classifier("llama", tok, labels, seed=7, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64)
    with torch.no_grad():  # make the MLP neurons matter, so that neutralizing them changes predictions
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(30.0)
    path = tmp_path_factory.mktemp("tiny-eval-model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    save_label_map(path, labels)
    return path


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    from spacy_ocrneurons.modeling import load_token_classifier

    return load_token_classifier(tiny_dir, device="cpu")


def random_ranking(width=64, layers=(0, 1), seed=0):
    rng = random.Random(seed)
    order = {}
    for layer in layers:
        perm = list(range(width))
        rng.shuffle(perm)
        order[layer] = perm
    return ev.NeuronRanking(order=order, provenance={"method": "test ranking"})


# ------------------------------------------------------------------------------------------ scoring


def test_score_tags_strict_matches_seqeval_hand_example():
    from seqeval.metrics import f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    gold = [["B-pers", "I-pers", "O", "B-loc"], ["B-loc", "O", "B-pers"]]
    # partial overlap (pers cut short) is wrong; an I-loc without B-loc is no entity in strict mode
    pred = [["B-pers", "O", "O", "B-loc"], ["I-loc", "O", "B-pers"]]
    s = ev.score_tags(gold, pred)
    assert (s["n_gold"], s["n_pred"], s["n_correct"]) == (4, 3, 2)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 4)
    assert s["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    kw = dict(mode="strict", scheme=IOB2)
    assert s["f1"] == pytest.approx(f1_score(gold, pred, **kw))
    assert s["precision"] == pytest.approx(precision_score(gold, pred, **kw))
    assert s["recall"] == pytest.approx(recall_score(gold, pred, **kw))
    # the lenient (conlleval) mode would accept the I-loc entity: strict differs
    assert f1_score(gold, pred) > s["f1"]
    assert s["per_type"]["loc"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2, "n_pred": 1})
    assert s["per_type"]["pers"]["support"] == 2 and s["per_type"]["pers"]["f1"] == pytest.approx(0.5)
    # no entities at all: zeros, no crash
    empty = ev.score_tags([["O", "O"]], [["O", "O"]])
    assert (empty["f1"], empty["n_gold"], empty["per_type"]) == (0.0, 0, {})
    with pytest.raises(ValueError, match="sequence 0"):
        ev.score_tags([["O"]], [["O", "O"]])


def test_parse_grid_helpers():
    assert ev.parse_layer_range("all", 4) == [0, 1, 2, 3]
    assert ev.parse_layer_range("0-3", 2) == [0, 1]
    assert ev.parse_layer_range("25-31", 32) == list(range(25, 32))
    assert ev.parse_layer_range("25-31", 4) == []
    assert ev.parse_layer_range("2-", 4) == [2, 3]
    assert ev.parse_layer_range("last2", 5) == [3, 4]
    assert ev.parse_layer_range("0+3-4", 5) == [0, 3, 4]
    with pytest.raises(ValueError, match="Invalid layer range"):
        ev.parse_layer_range("early", 4)
    assert ev.parse_k_values("1,2,4,8", 64) == [1, 2, 4, 8]
    assert ev.parse_k_values("100:1000:300", 14336) == [100, 400, 700, 1000]
    assert ev.parse_k_values("0.25,0.5,128", 64) == [16, 32, 64]
    assert ev.default_k_values(14336)[:3] == [100, 200, 300] and ev.default_k_values(14336)[-1] == 11000
    assert ev.default_k_values(64) == [1, 2, 4, 8, 16, 32]
    grid = ev.build_grid([2, 4], [0.1, 0.9], ["all", "0-5", "25-31"], 2)  # 0-5 clips to all; 25-31 to nothing
    assert {(s.k, s.factor, s.layers) for s in grid} == {(2, 0.1, "all"), (4, 0.1, "all"), (2, 0.9, "all"), (4, 0.9, "all")}
    assert ev.parse_named_paths(["clean=a.tsv", "medium=b.tsv"]) == {"clean": ev.Path("a.tsv"), "medium": ev.Path("b.tsv")}
    with pytest.raises(ValueError, match="twice"):
        ev.parse_named_paths(["clean=a.tsv", "clean=b.tsv"])
    assert ev.selection_sets(["clean", "low", "high"]) == ["low", "high"]
    assert ev.selection_sets(["clean"]) == ["clean"]
    assert ev.selection_sets(["clean", "low"], "all") == ["clean", "low"]


def test_rankings_keep_rank_order(tmp_path):
    import numpy as np

    from spacy_ocrneurons.identify import NeuronStats
    from spacy_ocrneurons.profile import NeutralizationProfile

    ranking = random_ranking(seed=3)
    path = ranking.save(tmp_path / "ranking.json")
    back = ev.load_ranking(path)
    assert back.order == ranking.order
    assert back.top_k(3, [0, 1, 5]) == {0: ranking.order[0][:3], 1: ranking.order[1][:3]}
    # the statistics .npz written by `identify`: full ranking by the statistic, most sensitive first
    rng = np.random.default_rng(0)
    stats = NeuronStats(64, [0, 1])
    for layer in (0, 1):
        clean = rng.normal(size=(20, 64))
        noisy = clean.copy()
        noisy[:, [5, 9]] += 3.0 * (layer + 1)  # neurons 5 and 9 react to noise
        stats.update(layer, clean, noisy)
    stats.save(tmp_path / "stats.npz", prefix="context__")
    summary = {"format": "spacy-ocrneurons/identify", "stats": str(tmp_path / "stats.npz"), "statistic": "mean_abs_diff",
               "rank_mode": "context", "site": "mlp.up_proj", "model": {"intermediate_size": 64}}
    (tmp_path / "identify.json").write_text(json.dumps(summary))
    for src in (tmp_path / "identify.json", tmp_path / "stats.npz"):
        r = ev.load_ranking(src)
        assert set(r.order[0][:2]) == {5, 9} and len(r.order[1]) == 64
    # profile files: one per k; an unordered profile cannot give a smaller top-k
    for k in (2, 4):
        NeutralizationProfile(neurons={0: ranking.order[0][:k]}, factor=0.5, provenance={"k": k}).save(tmp_path / f"p-k{k}.json")
    pset = ev.load_ranking([tmp_path / "p-k2.json", tmp_path / "p-k4.json"])
    assert sorted(pset.profiles) == [2, 4] and sorted(pset.top_k(2, [0, 1])[0]) == sorted(ranking.order[0][:2])
    single = ev.load_ranking(tmp_path / "p-k4.json")
    with pytest.raises(ValueError, match="k=1"):
        single.top_k(1, [0])


# ------------------------------------------------------------------------------------------ tagging


def test_prepared_texts_match_tag_texts(loaded, tmp_path):
    from spacy_ocrneurons.modeling import tag_texts

    es = ev.load_eval_set(write_tsv(tmp_path / "d.tsv", DEV_CLEAN + TEST_CLEAN), "clean", "dev")
    prep = ev.PreparedTexts(loaded, es.items, max_length=8, stride=3, batch_size=40)  # several windows per text
    assert prep.tag(loaded) == tag_texts(loaded, es.items, max_length=8, stride=3, batch_size=40)
    profile = ev.make_profile(random_ranking(), ev.Setting(32, 0.0, "all", (0, 1)), {})
    with profile.apply(loaded.model):
        hooked = prep.tag(loaded)
        assert hooked == tag_texts(loaded, es.items, max_length=8, stride=3, batch_size=40)
    assert hooked != prep.tag(loaded)  # the profile changes predictions, and the hooks are gone afterwards


# ------------------------------------------------------------------------------------------ end to end


def _make_rule_pipeline(tmp_path):
    import spacy

    nlp = spacy.blank("fr")
    ruler = nlp.add_pipe("entity_ruler")
    ruler.add_patterns([{"label": "loc", "pattern": "Paris"}, {"label": "loc", "pattern": "Marseille"},
                        {"label": "pers", "pattern": [{"TEXT": "Henri"}, {"TEXT": "Poincaré"}]}])
    nlp.to_disk(tmp_path / "rules")
    return nlp


def test_score_pipeline_and_evaluate_spacy(tmp_path):
    nlp = _make_rule_pipeline(tmp_path)
    test_path = write_tsv(tmp_path / "test.tsv", TEST_CLEAN)
    es = ev.load_eval_set(test_path, "clean", "test")
    s = ev.score_pipeline(nlp, es)
    # gold: 7 entities; rules find Marseille, Paris (correct) and "Henri Poincaré" (gold is "M. Henri Poincaré")
    assert (s["n_gold"], s["n_pred"], s["n_correct"]) == (7, 3, 2)
    assert s["per_type"]["loc"]["precision"] == 1.0
    out = ev.evaluate_pipeline(tmp_path / "rules", {"test": {"clean": test_path}}, name="spaCy rules",
                               output=tmp_path / "rules.json", predictions_dir=tmp_path / "pred")
    assert out["test"]["clean"]["f1"] == pytest.approx(s["f1"])
    name, scores = ev.read_extra_row(f"spaCy rules={tmp_path / 'rules.json'}")
    assert name == "spaCy rules" and scores["clean"]["n_correct"] == 2
    pred = hipe.read_hipe_tsv(tmp_path / "pred" / "test-clean-spacy-rules.tsv")
    assert [t.get("NE-COARSE-LIT") for t in pred[0].tokens][8:13] == ["O", "B-pers", "I-pers", "O", "B-loc"]


def test_sweep_selects_on_dev_and_reports_on_test(tmp_path, tiny_dir, loaded, monkeypatch):
    """Dev gold = predictions under setting A, test gold = predictions under setting B: the choice must be A."""
    from typer.testing import CliRunner

    from spacy_ocrneurons import modeling
    from spacy_ocrneurons.cli import app

    ranking = random_ranking(seed=1)
    ranking_path = ranking.save(tmp_path / "ranking.json")
    setting_a = ev.Setting(2, 0.0, "all", (0, 1))
    setting_b = ev.Setting(32, 0.0, "all", (0, 1))
    prof_a, prof_b = (ev.make_profile(ranking, s, {}) for s in (setting_a, setting_b))

    files = {"dev-clean": DEV_CLEAN, "dev-medium": DEV_MEDIUM, "test-clean": TEST_CLEAN, "test-medium": TEST_MEDIUM}
    paths = {name: write_tsv(tmp_path / f"{name}.tsv", sents) for name, sents in files.items()}
    preds = {}
    for name, path in paths.items():
        prep = ev.PreparedTexts(loaded, ev.load_eval_set(path, name, "dev").items)
        for label, prof in (("a", prof_a), ("b", prof_b)):
            with prof.apply(loaded.model):
                preds[name, label] = prep.predict_bio(loaded)
        preds[name, "base"] = prep.predict_bio(loaded)
    for name, path in paths.items():
        relabel_tsv(path, preds[name, "a" if name.startswith("dev") else "b"])
    # preconditions: gold has entities, and A and B disagree on the test sets
    assert all(any(t != "O" for doc in preds[n, "a"] for t in doc) for n in paths)
    assert preds["test-clean", "a"] != preds["test-clean", "b"] and preds["test-medium", "a"] != preds["test-medium", "b"]
    _make_rule_pipeline(tmp_path)
    ev.evaluate_pipeline(tmp_path / "rules", {"test": {"clean": paths["test-clean"], "medium": paths["test-medium"]}},
                         name="spaCy rules", output=tmp_path / "rules.json")

    # count model loads and record the order of file reads vs the choice
    loads, events = [], []
    real_load, real_read, real_choose = modeling.load_token_classifier, hipe.read_hipe_tsv, ev.choose_setting
    monkeypatch.setattr(modeling, "load_token_classifier", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    monkeypatch.setattr(hipe, "read_hipe_tsv", lambda p: events.append(("read", str(p))) or real_read(p))
    monkeypatch.setattr(ev, "choose_setting", lambda *a, **k: events.append(("choose", "")) or real_choose(*a, **k))

    out, plots, chosen_path = tmp_path / "metrics", tmp_path / "plots", tmp_path / "profiles" / "chosen.json"
    args = ["evaluate", "--base", str(tiny_dir), "--ranking", str(ranking_path), "--k", "2,8,32", "--factors", "0,0.5",
            "--layer-ranges", "all,1,25-31", "--output", str(out), "--plots", str(plots), "--profile-out", str(chosen_path),
            "--device", "cpu", "--seed", "5", "--extra-row", f"spaCy rules={tmp_path / 'rules.json'}"]
    for split in ("dev", "test"):
        for noise in ("clean", "medium"):
            args += [f"--{split}", f"{noise}={paths[f'{split}-{noise}']}"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)

    assert len(loads) == 1  # one model for the whole sweep
    choose_at = events.index(("choose", ""))
    reads = [(i, ev.Path(p).name) for i, (kind, p) in enumerate(events) if kind == "read"]
    assert all(i < choose_at for i, p in reads if p.startswith("dev-"))
    assert all(i > choose_at for i, p in reads if p.startswith("test-")) and any(p.startswith("test-") for _, p in reads)

    results = json.loads((out / "results.json").read_text())
    sweep = results["dev"]["sweep"]
    assert len(sweep) == 3 * 2 * 2 and results["chosen"]["select_on"] == ["medium"]
    chosen = results["chosen"]
    assert (chosen["k"], chosen["factor"], chosen["layers"]) == (2, 0.0, "all")
    assert chosen["dev_selection_score"] == pytest.approx(1.0) == max(r["selection_score"] for r in sweep)
    # on test, B would have been best (gold = its predictions), and the report shows A's lower test score
    test = results["test"]
    assert test["neutralized"]["clean"]["f1"] < 1.0 and test["neutralized"]["medium"]["f1"] < 1.0
    gold_test = {n: [[t for t in d] for d in preds[f"test-{n}", "b"]] for n in ("clean", "medium")}
    for n in ("clean", "medium"):
        assert ev.score_tags(gold_test[n], preds[f"test-{n}", "b"])["f1"] == 1.0
        assert test["neutralized"][n]["f1"] == pytest.approx(ev.score_tags(gold_test[n], preds[f"test-{n}", "a"])["f1"])
        assert test["baseline"][n]["f1"] == pytest.approx(ev.score_tags(gold_test[n], preds[f"test-{n}", "base"])["f1"])
    assert set(test) == {"baseline", "neutralized", "random control"}

    # chosen profile = top-2 of the ranking in rank order (not the 2 smallest indices); control = same counts
    from spacy_ocrneurons.profile import NeutralizationProfile

    prof = NeutralizationProfile.load(chosen_path)
    assert prof.neurons == {l: sorted(ranking.order[l][:2]) for l in (0, 1)} and prof.factor == 0.0
    assert prof.provenance["selected_on"] == "dev"
    control = NeutralizationProfile.load(chosen_path.with_name("chosen-random.json"))
    assert {l: len(v) for l, v in control.neurons.items()} == {0: 2, 1: 2}
    assert all(not set(control.neurons[l]) & set(prof.neurons[l]) for l in (0, 1))

    # predictions in HIPE TSV: same tokens as gold, predictions in NE-COARSE-LIT, 'O'/'_' elsewhere
    for split in ("dev", "test"):
        for noise in ("clean", "medium"):
            gold_docs = hipe.read_hipe_tsv(paths[f"{split}-{noise}"])
            systems = ("baseline", "neutralized") + (("random-control",) if split == "test" else ())
            for system in systems:
                pred_docs = hipe.read_hipe_tsv(out / "predictions" / f"{split}-{noise}-{system}.tsv")
                assert [[t.text for t in d.tokens] for d in pred_docs] == [[t.text for t in d.tokens] for d in gold_docs]
                assert [d.comments for d in pred_docs] == [d.comments for d in gold_docs]
                assert all(t.get("NEL-LIT") == "_" and t.get("NE-FINE-LIT") == "O" for d in pred_docs for t in d.tokens)
                assert [t.get("MISC") for d in pred_docs for t in d.tokens] == [t.get("MISC") for d in gold_docs for t in d.tokens]
            neut = hipe.read_hipe_tsv(out / "predictions" / f"{split}-{noise}-neutralized.tsv")
            assert [[t.get("NE-COARSE-LIT") for t in d.tokens] for d in neut] == preds[f"{split}-{noise}", "a"]

    md = (out / "results.md").read_text()
    for row in ("| baseline |", "| neutralized |", "| random control |", "| spaCy rules |", "| loc |", "| pers |"):
        assert row in md
    for f in ("0", "0.5"):
        png = plots / f"f1_vs_k_factor{f}.png"
        assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_test_set_must_differ_from_dev(loaded, tmp_path):
    path = write_tsv(tmp_path / "d.tsv", DEV_CLEAN)
    with pytest.raises(ValueError, match="also dev files"):
        ev.run_evaluation(loaded, random_ranking(), {"clean": path}, {"clean": path}, ks=[2], factors=[0.5],
                          output_dir=tmp_path / "m", plots_dir=None, profile_out=None, progress=False)
    with pytest.raises(TypeError, match="Choice"):
        ev.report_on_test(loaded, {"k": 2}, None, None, {"clean": path})


def test_dev_sweep_with_random_control(loaded, tmp_path):
    dev = {"clean": ev.load_eval_set(write_tsv(tmp_path / "c.tsv", DEV_CLEAN), "clean", "dev"),
           "medium": ev.load_eval_set(write_tsv(tmp_path / "m.tsv", DEV_MEDIUM), "medium", "dev")}
    settings = ev.build_grid([2, 8], [0.5], ["all"], 2)
    sweep = ev.sweep_dev(loaded, random_ranking(), dev, settings, select_on="all", random_control_seed=0, progress=False)
    assert sweep.select_on == ["clean", "medium"]
    for row in sweep.rows:
        assert set(row["scores"]) == {"clean", "medium"} and "random_control" in row
        assert row["selection_score"] == pytest.approx((row["scores"]["clean"]["f1"] + row["scores"]["medium"]["f1"]) / 2)
    choice = ev.choose_setting(sweep, settings)
    assert choice.dev_score == max(r["selection_score"] for r in sweep.rows)
    results = {"dev": {"sweep": sweep.rows}, "chosen": choice.to_dict()}
    assert [p.name for p in ev.plot_f1_vs_k(results, tmp_path / "plots")] == ["f1_vs_k_factor0.5.png"]
    test_set = ev.load_eval_set(tmp_path / "c.tsv", "clean", "test")
    with pytest.raises(ValueError, match="non-dev"):
        ev.sweep_dev(loaded, random_ranking(), {"clean": test_set}, settings, progress=False)
