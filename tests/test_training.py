"""LoRA fine-tuning (training.py) and the demo base model (base_model.pretrain_causal_lm / build_demo_base_model).

Everything runs on tiny models (2 layers, hidden 32) and a handful of hand-written sentences.
"""
import inspect
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from spacy_ocrneurons import training  # noqa: E402
from spacy_ocrneurons.alignment import IGNORE_INDEX, encode_text, label_list  # noqa: E402
from spacy_ocrneurons.base_model import (  # noqa: E402
    build_demo_base_model,
    pretrain_causal_lm,
    small_config,
    train_bpe_tokenizer,
)
from spacy_ocrneurons.modeling import forward_logits, load_token_classifier, model_inputs, read_label_map  # noqa: E402
from spacy_ocrneurons.training import (  # noqa: E402
    build_examples,
    docs_to_sentences,
    load_sentences,
    load_train_config,
    sentence_text,
    train_token_classifier,
)

ROOT = Path(__file__).resolve().parents[1]

# (words, tags, spaces)
TRAIN = [
    ("Monsieur Dupont est arrivé à Paris hier .".split(), ["O", "B-pers", "O", "O", "O", "B-loc", "O", "O"]),
    ("Le maire de Lyon a reçu Jean Martin .".split(), ["O", "O", "O", "B-loc", "O", "O", "B-pers", "I-pers", "O"]),
    ("On annonce de Berlin la mort du général Moreau .".split(),
     ["O", "O", "O", "B-loc", "O", "O", "O", "O", "B-pers", "O"]),
    ("Madame Durand quitte Genève pour Lausanne .".split(), ["O", "B-pers", "O", "B-loc", "O", "B-loc", "O"]),
    ("Le conseil s' est réuni hier soir .".split(), ["O"] * 8),
    ("Pierre Lefèvre habite à Marseille depuis longtemps .".split(),
     ["B-pers", "I-pers", "O", "O", "B-loc", "O", "O", "O"]),
    ("Les journaux de Vienne parlent de Paul Bernard .".split(),
     ["O", "O", "O", "B-loc", "O", "O", "B-pers", "I-pers", "O"]),
    ("Il pleut beaucoup à Bordeaux cette semaine .".split(), ["O", "O", "O", "O", "B-loc", "O", "O", "O"]),
]
DEV = [
    ("Monsieur Martin est parti pour Lyon .".split(), ["O", "B-pers", "O", "O", "O", "B-loc", "O"]),
    ("Le général Dupont habite à Genève .".split(), ["O", "O", "B-pers", "O", "O", "B-loc", "O"]),
    ("Il fait beau à Paris .".split(), ["O", "O", "O", "O", "B-loc", "O"]),
]
TEST = [("Jean Durand arrive de Berlin .".split(), ["B-pers", "I-pers", "O", "O", "B-loc", "O"])]


def with_spaces(data):
    # no space before the final period, to exercise `spaces`
    return [(w, t, [True] * (len(w) - 2) + [False, False]) for w, t in data]


TRAIN_S, DEV_S, TEST_S = with_spaces(TRAIN), with_spaces(DEV), with_spaces(TEST)
NOISY_S = [([w.replace("e", "c").replace("i", "l") for w in words], tags, spaces) for words, tags, spaces in TRAIN_S]

FAST = dict(lora_r=4, lora_alpha=8, lora_dropout=0.1, batch_size=4, max_length=64, stride=8, progress=False,
            device="cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train several times faster on one thread (no thread contention); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def all_texts():
    return [sentence_text(w, s)[0] for w, _, s in TRAIN_S + DEV_S + TEST_S + NOISY_S]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random Llama causal LM + BPE tokenizer saved as a HF checkpoint."""
    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("base")
    tok = train_bpe_tokenizer(all_texts(), vocab_size=300)
    config = small_config("llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, tokenizer=tok)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def fitted(base_dir, tmp_path_factory):
    """A run that fits the tiny training set (dev = the training sentences themselves)."""
    out = tmp_path_factory.mktemp("fit")
    result = train_token_classifier(base_dir, TRAIN_S, TRAIN_S, out, lr=3e-2, epochs=20, seed=0,
                                    target_modules=["up_proj"], **FAST)
    return result


# ---------------------------------------------------------------------------------------------- data


def test_sentence_text_and_examples_cover_every_token_once(base_dir):
    from transformers import AutoTokenizer

    words, tags, spaces = TRAIN_S[1]
    text, spans = sentence_text(words, spaces)
    assert text == "Le maire de Lyon a reçu Jean Martin."
    assert [text[a:b] for a, b in spans] == words
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    labels = label_list(["loc", "pers"])
    label2id = {l: i for i, l in enumerate(labels)}
    whole = build_examples(tok, [TRAIN_S[1]], label2id, max_length=512, stride=4)
    assert len(whole) == 1 and whole[0].input_ids[0] == tok.bos_token_id
    windowed = build_examples(tok, [TRAIN_S[1]], label2id, max_length=6, stride=2)
    assert len(windowed) > 1
    assert all(len(e.input_ids) <= 6 and e.input_ids[0] == tok.bos_token_id for e in windowed)
    assert all(len(e.labels) == len(e.input_ids) and e.labels[0] == IGNORE_INDEX for e in windowed)
    # the labelled pieces of all windows, in order, are exactly the whole sentence's targets: none dropped or doubled
    flat = [l for e in windowed for l in e.labels if l != IGNORE_INDEX]
    assert flat == [l for l in whole[0].labels if l != IGNORE_INDEX]
    enc = encode_text(tok, text, spans)
    assert [labels[i] for i in flat] == [t for t, p in zip(tags, enc.first_piece) if p >= 0]
    assert sum(p >= 0 for p in enc.first_piece) >= len(words) - 1


def test_load_sentences_from_tsv_and_docbin(tmp_path):
    import spacy
    from spacy.tokens import DocBin, Span

    header = "TOKEN\tNE-COARSE-LIT\tNE-COARSE-METO\tNE-FINE-LIT\tNE-FINE-METO\tNE-FINE-COMP\tNE-NESTED\tNEL-LIT\tNEL-METO\tMISC\n"
    rows = [("Monsieur", "O", "_"), ("Dupont", "B-pers", "_"), ("à", "O", "_"), ("Paris", "B-loc", "NoSpaceAfter"),
            (".", "O", "EndOfSentence"), ("Il", "O", "_"), ("pleut", "O", "NoSpaceAfter"), (".", "O", "EndOfSentence")]
    lines = [header, "# hipe2022:document_id = d1\n"]
    lines += [f"{t}\t{tag}\tO\tO\tO\tO\tO\t_\t_\t{misc}\n" for t, tag, misc in rows]
    tsv = tmp_path / "x.tsv"
    tsv.write_text("".join(lines), encoding="utf8")
    sents = load_sentences(tsv)
    assert sents[0] == (["Monsieur", "Dupont", "à", "Paris", "."], ["O", "B-pers", "O", "B-loc", "O"],
                        [True, True, True, False, True])
    assert sents[1][0] == ["Il", "pleut", "."]

    nlp = spacy.blank("fr")
    doc = nlp("Monsieur Dupont à Paris. Il pleut.")
    doc.ents = [Span(doc, 1, 2, "pers"), Span(doc, 3, 4, "loc")]
    for t in doc:
        t.is_sent_start = t.i in (0, 5)
    db_path = tmp_path / "x.spacy"
    DocBin(docs=[doc]).to_disk(db_path)
    from_db = load_sentences(db_path)
    assert from_db == docs_to_sentences([doc])
    assert from_db[0] == (["Monsieur", "Dupont", "à", "Paris", "."], ["O", "B-pers", "O", "B-loc", "O"],
                          [True, True, True, False, True])
    (tmp_path / "x.conll").write_text("x\n", encoding="utf8")
    with pytest.raises(ValueError, match="Unsupported data file"):
        load_sentences(tmp_path / "x.conll")


def test_config_file_holds_paper_defaults_and_overrides(tmp_path):
    cfg = load_train_config(ROOT / "configs" / "train.cfg")
    assert cfg == load_train_config(None)  # the documented file equals the built-in defaults
    assert (cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["target_modules"]) == (12, 32, 0.1, ["up_proj"])
    assert (cfg["lr"], cfg["weight_decay"]) == (1e-4, 0.01)
    sig = inspect.signature(train_token_classifier).parameters
    assert all(sig[k].default == v or list(sig[k].default) == v for k, v in cfg.items() if k in sig)
    over = load_train_config(ROOT / "configs" / "train.cfg", {"lr": 2e-3, "epochs": None, "bidirectional": True})
    assert over["lr"] == 2e-3 and over["epochs"] == cfg["epochs"] and over["bidirectional"] is True
    bad = tmp_path / "bad.cfg"
    bad.write_text("[lora]\nrank = 3\n", encoding="utf8")
    with pytest.raises(ValueError, match="lora.rank"):
        load_train_config(bad)
    with pytest.raises(ValueError, match="Unknown training setting"):
        load_train_config(None, {"learning_rate": 1.0})


# ---------------------------------------------------------------------------------------------- training


def test_training_lowers_loss_and_fits_the_training_set(base_dir, fitted):
    log = [json.loads(l) for l in (fitted.output_dir / "training_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["event"] == "train"]
    evals = [r for r in log if r["event"] == "eval"]
    assert len(evals) == 20 and losses[-1] < 0.5 * losses[0]
    assert evals[-1]["train_loss"] < evals[0]["train_loss"]
    # an untrained head on the same base: low F1; the trained adapter: the training set is fitted
    untrained = load_token_classifier(base_dir, labels=fitted.labels, device="cpu")
    before = training.evaluate_sentences(untrained, TRAIN_S)["f1"]
    after = training.evaluate_sentences(load_token_classifier(base_dir, fitted.best_dir, device="cpu"), TRAIN_S)
    assert after["f1"] >= 0.9 and after["f1"] > before + 0.5, (before, after)
    assert after["f1"] == pytest.approx(fitted.best["dev_f1"])


def test_adapter_dir_reloads_with_the_same_logits(base_dir, fitted):
    last = fitted.last_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", "labels.json", "tokenizer.json"):
        assert (last / name).exists(), name
    cfg = json.loads((last / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["target_modules"] == ["up_proj"] and "score" in cfg["modules_to_save"]
    assert read_label_map(last)["labels"] == ["O", "B-loc", "I-loc", "B-pers", "I-pers"]
    ids = torch.tensor([[1, 10, 20, 30, 40, 3, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        expected = fitted.model(input_ids=ids, attention_mask=mask).logits
    for merge in (False, True):
        loaded = load_token_classifier(base_dir, last, device="cpu", merge=merge)
        with torch.no_grad():
            got = forward_logits(loaded, ids, mask)
        assert torch.allclose(got[:, :5], expected[:, :5], atol=1e-5), merge


def test_model_selection_uses_dev_and_keeps_the_best_epoch(base_dir, tmp_path, monkeypatch):
    assert not any("test" in p for p in inspect.signature(train_token_classifier).parameters)
    scripted = iter([0.2, 0.9, 0.5])
    seen = []
    real = training.evaluate_sentences

    def scripted_eval(loaded, sentences, **kw):
        seen.append([list(w) for w, _, _ in sentences])
        scores = real(loaded, sentences, **kw)
        return dict(scores, f1=next(scripted))

    monkeypatch.setattr(training, "evaluate_sentences", scripted_eval)
    res = train_token_classifier(base_dir, TRAIN_S, DEV_S, tmp_path / "sel", lr=1e-2, epochs=3, seed=1, **FAST)
    assert seen == [[w for w, _, _ in DEV_S]] * 3  # only dev is ever evaluated
    metrics = json.loads((tmp_path / "sel" / "metrics.json").read_text())
    f1s = [e["dev_f1"] for e in metrics["evaluations"]]
    assert f1s == [0.2, 0.9, 0.5] and metrics["best"]["dev_f1"] == max(f1s) and metrics["best"]["epoch"] == 2.0
    assert read_label_map(res.best_dir)["step"] == metrics["best"]["step"]
    # best/ holds the epoch-2 weights: identical to the last adapter of a run stopped after epoch 2
    monkeypatch.setattr(training, "evaluate_sentences", real)
    ref = train_token_classifier(base_dir, TRAIN_S, DEV_S, tmp_path / "ref", lr=1e-2, epochs=3, seed=1,
                                 stop_after_epoch=2, **FAST)
    assert not ref.finished
    assert_same_adapter(res.best_dir, ref.last_dir)
    with pytest.raises(AssertionError):
        assert_same_adapter(res.best_dir, res.last_dir)


def assert_same_adapter(a, b):
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize("eval_every,stop", [(None, {"stop_after_epoch": 1}), (3, {"stop_after_step": 3})])
def test_resume_gives_the_same_result_as_an_uninterrupted_run(base_dir, tmp_path, eval_every, stop):
    kw = dict(FAST, lr=5e-3, epochs=2, seed=3, eval_every=eval_every)
    straight = train_token_classifier(base_dir, TRAIN_S, DEV_S, tmp_path / "a", **kw)
    part = train_token_classifier(base_dir, TRAIN_S, DEV_S, tmp_path / "b", **kw, **stop)
    assert not part.finished and straight.finished
    resumed = train_token_classifier(base_dir, TRAIN_S, DEV_S, tmp_path / "b", resume=True, **kw)
    assert resumed.finished
    assert_same_adapter(straight.last_dir, resumed.last_dir)
    assert_same_adapter(straight.best_dir, resumed.best_dir)
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert ma["evaluations"] == mb["evaluations"]
    log_a = [json.loads(l) for l in (tmp_path / "a" / "training_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(l) for l in (tmp_path / "b" / "training_log.jsonl").read_text().splitlines()]
    assert log_a == log_b
    with pytest.raises(ValueError, match="lr"):
        train_token_classifier(base_dir, TRAIN_S, DEV_S, tmp_path / "b", resume=True, **dict(kw, lr=1e-3))


def test_bidirectional_flag_round_trips_and_changes_logits(base_dir, tmp_path):
    res = train_token_classifier(base_dir, TRAIN_S, DEV_S, tmp_path / "bi", lr=1e-2, epochs=1, bidirectional=True,
                                 **FAST)
    assert read_label_map(res.best_dir)["bidirectional"] is True
    loaded = load_token_classifier(base_dir, res.last_dir, device="cpu", merge=False)
    assert loaded.bidirectional is True
    ids = torch.tensor([[1, 10, 20, 30, 40]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        bi = forward_logits(loaded, ids, mask)
        causal = loaded.model(**model_inputs(loaded, ids, mask, bidirectional=False)).logits
        trained = res.model(**model_inputs(res.model, ids, mask, bidirectional=True)).logits
    assert torch.allclose(bi, trained, atol=1e-5)
    assert not torch.allclose(bi[:, 0], causal[:, 0], atol=1e-4)  # the first piece now sees what follows
    causal_run = train_token_classifier(base_dir, TRAIN_S, DEV_S, tmp_path / "ca", lr=1e-2, epochs=1, **FAST)
    assert read_label_map(causal_run.best_dir)["bidirectional"] is False


def test_train_on_noisy_and_mixed(base_dir, tmp_path):
    with pytest.raises(ValueError, match="noisy_train_data"):
        train_token_classifier(base_dir, TRAIN_S, DEV_S, tmp_path / "x", train_on="mixed", **FAST)
    res = train_token_classifier(base_dir, TRAIN_S, DEV_S, tmp_path / "m", noisy_train_data=NOISY_S,
                                 train_on="mixed", epochs=1, **FAST)
    data = json.loads((tmp_path / "m" / "metrics.json").read_text())["data"]
    assert data["train_sentences"] == len(TRAIN_S) + len(NOISY_S) and data["noisy_sentences"] == len(NOISY_S)
    assert read_label_map(res.best_dir)["train_on"] == "mixed"
    noisy = train_token_classifier(base_dir, TRAIN_S, DEV_S, tmp_path / "n", noisy_train_data=NOISY_S,
                                   train_on="noisy", epochs=1, **FAST)
    assert json.loads((tmp_path / "n" / "metrics.json").read_text())["data"]["train_sentences"] == len(NOISY_S)
    assert noisy.finished


# ---------------------------------------------------------------------------------------------- base model


def test_pretrain_causal_lm_lowers_the_lm_loss():
    from transformers import LlamaForCausalLM

    texts = [sentence_text(w, s)[0] for w, _, s in TRAIN_S]
    tok = train_bpe_tokenizer(texts, vocab_size=200)
    torch.manual_seed(0)
    model = LlamaForCausalLM(small_config("llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, tokenizer=tok))
    stats = pretrain_causal_lm(model, tok, texts, steps=40, batch_size=4, block_size=32, lr=1e-2, progress=False)
    assert stats["loss_after"] < stats["loss_before"] - 1.0, stats
    assert len(stats["losses"]) == 40 and stats["losses"][-1] < stats["losses"][0]


def test_build_demo_base_model_loads_as_token_classifier(tmp_path):
    from transformers import AutoModelForTokenClassification

    out = build_demo_base_model(all_texts(), tmp_path / "demo", arch="mistral", vocab_size=200, hidden_size=32,
                                layers=2, intermediate_size=64, heads=2, steps=5, batch_size=2, block_size=16,
                                progress=False)
    info = json.loads((out / "pretraining.json").read_text())
    assert info["arch"] == "mistral" and info["steps"] == 5 and info["loss_after"] < info["loss_before"]
    clf = AutoModelForTokenClassification.from_pretrained(str(out), num_labels=5)
    assert type(clf).__name__ == "MistralForTokenClassification" and clf.config.num_hidden_layers == 2


def test_cli_pretrain_base_and_train(tmp_path):
    from typer.testing import CliRunner

    from spacy_ocrneurons.cli import app

    rows = []
    for words, tags, spaces in TRAIN_S + DEV_S:
        for i, (w, t, sp) in enumerate(zip(words, tags, spaces)):
            flags = [] if sp else ["NoSpaceAfter"]
            if i == len(words) - 1:
                flags.append("EndOfSentence")
            rows.append(f"{w}\t{t}\tO\tO\tO\tO\tO\t_\t_\t{'|'.join(flags) or '_'}\n")
    header = "TOKEN\tNE-COARSE-LIT\tNE-COARSE-METO\tNE-FINE-LIT\tNE-FINE-METO\tNE-FINE-COMP\tNE-NESTED\tNEL-LIT\tNEL-METO\tMISC\n# hipe2022:document_id = d1\n"
    n_train = sum(len(w) for w, _, _ in TRAIN_S)
    (tmp_path / "train.tsv").write_text(header + "".join(rows[:n_train]), encoding="utf8")
    (tmp_path / "dev.tsv").write_text(header + "".join(rows[n_train:]), encoding="utf8")
    runner = CliRunner()
    r = runner.invoke(app, ["pretrain-base", "--train", str(tmp_path / "train.tsv"), "--output", str(tmp_path / "base"),
                            "--vocab-size", "200", "--hidden-size", "32", "--layers", "2", "--intermediate-size", "64",
                            "--heads", "2", "--steps", "3", "--batch-size", "2", "--block-size", "16", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "base" / "config.json").exists()
    r = runner.invoke(app, ["train", "--base", str(tmp_path / "base"), "--train", str(tmp_path / "train.tsv"),
                            "--dev", str(tmp_path / "dev.tsv"), "--output", str(tmp_path / "lora"),
                            "--config", str(ROOT / "configs" / "train.cfg"), "--epochs", "1", "--batch-size", "4",
                            "--lora-r", "4", "--device", "cpu", "--bidirectional", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "Best dev F1" in r.output
    metrics = json.loads((tmp_path / "lora" / "metrics.json").read_text())
    assert metrics["settings"]["lora_r"] == 4 and metrics["settings"]["lr"] == 1e-4  # CLI override + config value
    assert read_label_map(tmp_path / "lora" / "best")["bidirectional"] is True
    r = runner.invoke(app, ["train", "--base", str(tmp_path / "nowhere"), "--train", str(tmp_path / "train.tsv"),
                            "--dev", str(tmp_path / "dev.tsv"), "--output", str(tmp_path / "x")])
    assert r.exit_code == 1 and "config.json" in r.output


def test_document_unit_keeps_whole_documents_with_every_entity(tmp_path):
    """`--unit document` trains on whole pages (windowed later), not sentences; nothing is dropped either way."""
    from spacy_ocrneurons.sample_data import sample_path
    from spacy_ocrneurons.training import load_sentences

    path = sample_path("dev")
    sentences = load_sentences(path, unit="sentence")
    documents = load_sentences(path, unit="document")
    assert len(documents) < len(sentences)
    assert sum(len(w) for w, _, _ in documents) == sum(len(w) for w, _, _ in sentences)
    n_ents = lambda units: sum(t.startswith("B-") for _, tags, _ in units for t in tags)  # noqa: E731
    assert n_ents(documents) == n_ents(sentences) > 0
    with pytest.raises(ValueError, match="unit"):
        load_sentences(path, unit="page")
