"""A miniature end-to-end run of every workflow step, through the same CLI commands project.yml calls."""
import json

import pytest
import spacy
from typer.testing import CliRunner

from spacy_ocrneurons.cli import app


def _run(args):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_all_steps_on_a_tiny_slice_of_the_sample(tmp_path, monkeypatch):
    import torch

    threads = torch.get_num_threads()
    monkeypatch.chdir(tmp_path)
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "assets").symlink_to(repo / "assets")
    try:
        _run(["prepare-data", "--dataset", "sample", "--output", "corpus", "--max-docs", "4"])
        for split in ("train", "dev", "test"):
            _run(["noise", f"corpus/{split}.tsv", f"corpus/{split}-noise-medium.tsv", "--level", "medium",
                  "--seed", "0", "--no-progress", "--report", f"metrics/noise-{split}.json"])
        report = json.loads(Path("metrics/noise-dev.json").read_text())
        assert 0 < report["cer"] < 1
        _run(["pretrain-base", "--train", "corpus/train.tsv", "--output", "training/base", "--vocab-size", "300",
              "--hidden-size", "32", "--layers", "2", "--intermediate-size", "64", "--heads", "2", "--steps", "5",
              "--batch-size", "4", "--block-size", "32", "--no-progress", "--threads", "1"])
        _run(["train", "--base", "training/base", "--train", "corpus/train.tsv", "--dev", "corpus/dev.tsv",
              "--output", "training/lora", "--epochs", "2", "--lr", "0.01", "--batch-size", "8", "--max-length", "64",
              "--no-progress", "--threads", "1"])
        metrics = json.loads(Path("training/lora/metrics.json").read_text())
        assert Path("training/lora/best/adapter_model.safetensors").exists()
        assert metrics["selection"].startswith("dev split") and "dev_f1" in metrics["best"]
        _run(["identify", "--base", "training/base", "--adapter", "training/lora/best", "--clean", "corpus/train.tsv",
              "--noise-level", "medium", "--k", "4,8", "--output-profiles", "profiles", "--metrics",
              "metrics/identify.json", "--plots", "plots", "--max-length", "64"])
        ident = json.loads(Path("metrics/identify.json").read_text())
        assert Path("profiles/ocr-sensitive-k4.json").exists() and Path("profiles/ocr-sensitive-k4-random.json").exists()
        assert Path("plots/cka_by_layer.png").stat().st_size > 1000
        assert ident
        _run(["evaluate", "--base", "training/base", "--adapter", "training/lora/best",
              "--ranking", "metrics/identify.json", "--dev", "clean=corpus/dev.tsv",
              "--dev", "medium=corpus/dev-noise-medium.tsv", "--test", "clean=corpus/test.tsv",
              "--test", "medium=corpus/test-noise-medium.tsv", "--k", "2,4", "--factors", "0.1,0.5",
              "--layer-ranges", "all,0", "--output", "metrics", "--plots", "plots", "--profile-out",
              "profiles/chosen.json", "--unit", "sentence", "--max-length", "64"])
        table = Path("metrics/results.md").read_text()
        for row in ("baseline", "neutralized", "random control"):
            assert f"| {row} |" in table
        assert Path("metrics/predictions/test-medium-neutralized.tsv").exists()
        _run(["assemble", "--output", "packages/pipeline", "--model", "training/base", "--adapter",
              "training/lora/best", "--profile", "profiles/chosen.json"])
        nlp = spacy.load("packages/pipeline")
        assert nlp.pipe_names == ["ocrneurons_ner"]
        chosen = json.loads(Path("profiles/chosen.json").read_text())
        assert json.loads(Path("packages/pipeline/ocrneurons_ner/profile.json").read_text())["neurons"] == chosen["neurons"]
        doc = nlp("M. Reinach est arrivé à Paris.")
        assert all(0 <= e.start < e.end <= len(doc) for e in doc.ents)
    finally:
        torch.set_num_threads(threads)
