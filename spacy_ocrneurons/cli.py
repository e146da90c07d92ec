"""Command-line interface: ``ocrneurons <command>`` or ``python -m spacy_ocrneurons <command>``.

Each command imports its heavy modules lazily so that ``--help`` stays fast.
"""
import typer

app = typer.Typer(
    name="ocrneurons",
    help="spacy-ocrneurons: robust NER on OCR'd historical documents (data, noise, training, neuron identification, evaluation, archives).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

# --- data and noise commands (hipe, noise) --------------------------------------------------


@app.command("convert")
def convert_cmd(
    input_path: str = typer.Argument(..., help="Input file: a HIPE .tsv or a spaCy .spacy DocBin."),
    output_path: str = typer.Argument(..., help="Output file: .spacy when the input is .tsv, .tsv when it is .spacy."),
    column: str = typer.Option("NE-COARSE-LIT", "--column", help="HIPE column whose IOB tags become doc.ents (and are written back from doc.ents)."),
    split: str = typer.Option("document", "--split", help="TSV -> DocBin: one Doc per 'document', 'sentence' (EndOfSentence) or 'segment'."),
    other_columns: str = typer.Option("original", "--other-columns", help="DocBin -> TSV: keep the 'original' values of the other NE/NEL columns, or write '_'."),
):
    """Convert HIPE TSV <-> spaCy DocBin, losslessly (comments, MISC and all columns are kept in the Docs' user data).

    Example: python -m spacy_ocrneurons convert corpus/train.tsv corpus/train.spacy
    """
    from pathlib import Path

    from .hipe import HipeFormatError, convert_docbin_to_hipe, convert_hipe_to_docbin

    src, dst = Path(input_path), Path(output_path)
    try:
        if src.suffix == ".spacy":
            n = convert_docbin_to_hipe(src, dst, column=column, other_columns=other_columns)
            typer.echo(f"Wrote {n} HIPE documents to {dst}")
        elif dst.suffix == ".spacy":
            n = convert_hipe_to_docbin(src, dst, column=column, split=split)
            typer.echo(f"Wrote {n} Docs to {dst}")
        else:
            raise ValueError("one of INPUT_PATH / OUTPUT_PATH must end in .spacy (the other is the HIPE TSV file)")
    except (HipeFormatError, ValueError, FileNotFoundError) as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(code=1)


@app.command("noise")
def noise_cmd(
    input_path: str = typer.Argument(..., help="Clean input: a HIPE .tsv or a spaCy .spacy DocBin."),
    output_path: str = typer.Argument(..., help="Noisy output, same format as the input (.tsv or .spacy)."),
    method: str = typer.Option("nlpaug", "--method", help="'nlpaug' (OcrAug at the paper's levels; token count kept) or 'typed' (our typed OCR distortions: diacritics, long s, ligatures, confusions, insertions, deletions, splits, merges)."),
    level: str = typer.Option("medium", "--level", help="Noise level: low, medium or high (nlpaug parameters of the paper, or the typed preset)."),
    seed: int = typer.Option(0, "--seed", help="Seed; each sentence gets its own seed derived from it, so output does not depend on order."),
    column: str = typer.Option("NE-COARSE-LIT", "--column", help="HIPE column whose labels are re-aligned to the noisy tokens (all IOB columns follow the text)."),
    diacritic_p: float = typer.Option(None, "--diacritic-p", help="typed: override the probability of diacritic confusions (é->e, ç->c ...)."),
    long_s_p: float = typer.Option(None, "--long-s-p", help="typed: override the probability of long-s confusions (s->ſ, f<->ſ)."),
    ligature_p: float = typer.Option(None, "--ligature-p", help="typed: override the probability of ligature confusions (fi<->ﬁ, œ<->oe ...)."),
    confusion_p: float = typer.Option(None, "--confusion-p", help="typed: override the probability of classic OCR confusions (rn<->m, l<->1, O<->0 ...)."),
    insert_p: float = typer.Option(None, "--insert-p", help="typed: override the per-character insertion probability."),
    delete_p: float = typer.Option(None, "--delete-p", help="typed: override the per-character deletion probability (a token is never emptied)."),
    split_p: float = typer.Option(None, "--split-p", help="typed: override the per-token probability of splitting a word in two."),
    merge_p: float = typer.Option(None, "--merge-p", help="typed: override the per-space probability of merging two words."),
    report: str = typer.Option(None, "--report", help="Also write the JSON report (achieved CER/WER, parameters) to this file."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
):
    """Make a noisy copy of a HIPE TSV or DocBin file; entity labels follow the text.

    Prints a JSON report with the character and word error rates actually achieved (Levenshtein distance).
    Example: python -m spacy_ocrneurons noise corpus/dev.tsv corpus/dev-noise-high.tsv --method nlpaug --level high
    """
    import dataclasses
    import json
    from pathlib import Path

    from .hipe import HipeFormatError
    from .noise import LEVELS, NoiseConfig, noise_file

    if method not in ("nlpaug", "typed"):
        typer.echo(f"Error: --method must be 'nlpaug' or 'typed', got {method!r}", err=True)
        raise typer.Exit(code=1)
    if level not in LEVELS:
        typer.echo(f"Error: --level must be one of {', '.join(LEVELS)}, got {level!r}", err=True)
        raise typer.Exit(code=1)
    overrides = {
        "diacritic_p": diacritic_p, "long_s_p": long_s_p, "ligature_p": ligature_p, "confusion_p": confusion_p,
        "insert_p": insert_p, "delete_p": delete_p, "split_p": split_p, "merge_p": merge_p,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    config = None
    try:
        if overrides:
            if method != "typed":
                raise ValueError(f"--{next(iter(overrides)).replace('_', '-')} only applies to --method typed")
            config = dataclasses.replace(NoiseConfig.preset(level), **overrides)
        result = noise_file(input_path, output_path, method=method, level=level, config=config, seed=seed,
                            column=column, progress=progress)
    except (HipeFormatError, ValueError, FileNotFoundError) as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(code=1)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    if report:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(text + "\n", encoding="utf-8")
    typer.echo(text)


@app.command("make-sample")
def make_sample_cmd(
    output: str = typer.Option("assets/sample", "--output", help="Folder for sample-{train,dev,test}-fr.tsv."),
):
    """(Re)generate the embedded synthetic French sample dataset (HIPE TSV, deterministic seeds).

    The committed files in assets/sample are exactly what this command writes.
    """
    from .sample_data import write_sample

    for path in write_sample(output):
        typer.echo(f"Wrote {path}")


@app.command("fetch-shared-data")
def fetch_shared_data_cmd(
    dest: str = typer.Option("assets", "--dest", help="Destination root: files go to DEST/hipe2020/fr and DEST/ajmc/fr."),
    shared: str = typer.Option("../shared/data", "--shared", help="The shared data folder holding hipe2020/ and ajmc/."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Copy again even if a verified copy is already there."),
):
    """Copy the real HIPE-2020 and AjMC French TSV files from a local shared folder, checking their git blob hashes.

    The data are licensed (HIPE-2020: CC BY-NC-SA 4.0, AjMC: CC BY 4.0) and are never committed.
    """
    from .hipe import copy_shared_data

    try:
        paths = copy_shared_data(dest, shared, overwrite=overwrite)
    except (FileNotFoundError, ValueError) as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(code=1)
    for path in paths:
        typer.echo(f"OK {path}")

# --- training commands ----------------------------------------------------------------------


@app.command("pretrain-base")
def pretrain_base_cmd(
    train: str = typer.Option(..., "--train", help="Unlabeled text: a HIPE .tsv, a spaCy .spacy DocBin (one text per sentence) or a .txt file (one text per line). Use the training split only."),
    output: str = typer.Option(..., "--output", help="Output directory: a normal HF checkpoint (config.json, model.safetensors, tokenizer files, pretraining.json)."),
    config: str = typer.Option(None, "--config", help="Training config whose [pretrain] section gives defaults for the options below (e.g. configs/train.cfg)."),
    arch: str = typer.Option(None, "--arch", help="'llama' or 'mistral' (default llama)."),
    vocab_size: int = typer.Option(None, "--vocab-size", help="BPE vocabulary size (default 2000)."),
    hidden_size: int = typer.Option(None, "--hidden-size", help="Hidden size (default 128)."),
    layers: int = typer.Option(None, "--layers", help="Decoder layers (default 4)."),
    intermediate_size: int = typer.Option(None, "--intermediate-size", help="MLP width = neurons per layer (default 344)."),
    heads: int = typer.Option(None, "--heads", help="Attention heads (default 4)."),
    steps: int = typer.Option(None, "--steps", help="Optimizer steps (default 300)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Blocks per step (default 16)."),
    block_size: int = typer.Option(None, "--block-size", help="Word pieces per block (default 128)."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (default 3e-3, cosine decay)."),
    seed: int = typer.Option(None, "--seed", help="Seed (default 0)."),
    column: str = typer.Option("NE-COARSE-LIT", "--column", help="HIPE column (only used to read the file)."),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice; 1 is fastest on a busy machine)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar with the LM loss."),
):
    """Build the demo base model: train a BPE tokenizer and a small Llama/Mistral causal LM on unlabeled text.

    Stands in for a real Llama-2/Mistral checkpoint where none can be downloaded; the LoRA step (`train`) then
    starts from a pretrained base. Example:
    python -m spacy_ocrneurons pretrain-base --train assets/sample/sample-train-fr.tsv --output training/base
    """
    import json

    from .base_model import build_demo_base_model
    from .training import load_pretrain_config, load_texts

    try:
        settings = {"arch": "llama", "vocab_size": 2000, "hidden_size": 128, "layers": 4, "intermediate_size": 344,
                    "heads": 4, "steps": 300, "batch_size": 16, "block_size": 128, "lr": 3e-3, "seed": 0}
        settings.update(load_pretrain_config(config))
        cli = {"arch": arch, "vocab_size": vocab_size, "hidden_size": hidden_size, "layers": layers,
               "intermediate_size": intermediate_size, "heads": heads, "steps": steps, "batch_size": batch_size,
               "block_size": block_size, "lr": lr, "seed": seed}
        settings.update({k: v for k, v in cli.items() if v is not None})
        if threads:
            import torch

            torch.set_num_threads(threads)
        texts = load_texts(train, column=column)
        out = build_demo_base_model(texts, output, progress=progress, **settings)
    except (ValueError, FileNotFoundError, TypeError) as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(code=1)
    info = json.loads((out / "pretraining.json").read_text(encoding="utf8"))
    typer.echo(f"Wrote base model to {out}: {info['texts']} texts, LM loss {info['loss_before']:.3f} -> "
               f"{info['loss_after']:.3f} in {info['elapsed_s']:.0f} s")


@app.command("train")
def train_cmd(
    base: str = typer.Option(..., "--base", help="Base model directory (HF checkpoint: a real Llama/Mistral or the output of pretrain-base)."),
    train: str = typer.Option(..., "--train", help="Clean training data: HIPE .tsv or spaCy .spacy."),
    dev: str = typer.Option(..., "--dev", help="Dev data (.tsv/.spacy) for model selection. The test split is never used here."),
    output: str = typer.Option(..., "--output", help="Output directory: best/ and last/ adapters, checkpoint/, metrics.json, training_log.jsonl."),
    config: str = typer.Option(None, "--config", help="Training config (.cfg or .json), e.g. configs/train.cfg (paper defaults) or configs/train-demo.cfg; options below override it. Default: the built-in paper defaults (= configs/train.cfg)."),
    noisy_train: str = typer.Option(None, "--noisy-train", help="Noisy training data (.tsv/.spacy, e.g. from `ocrneurons noise`), for --train-on noisy|mixed."),
    train_on: str = typer.Option(None, "--train-on", help="'clean', 'noisy' or 'mixed' (clean + noisy, shuffled)."),
    bidirectional: bool = typer.Option(None, "--bidirectional/--causal", help="Train with bidirectional (all-visible) attention; recorded in labels.json so the spaCy component uses it too."),
    epochs: int = typer.Option(None, "--epochs", help="Epochs."),
    batch_size: int = typer.Option(None, "--batch-size", help="Windows per optimizer step."),
    lr: float = typer.Option(None, "--lr", help="AdamW learning rate."),
    weight_decay: float = typer.Option(None, "--weight-decay", help="AdamW weight decay."),
    lora_r: int = typer.Option(None, "--lora-r", help="LoRA rank."),
    lora_alpha: float = typer.Option(None, "--lora-alpha", help="LoRA alpha."),
    lora_dropout: float = typer.Option(None, "--lora-dropout", help="LoRA dropout."),
    target_modules: str = typer.Option(None, "--target-modules", help="Comma-separated module names for LoRA (paper: up_proj)."),
    max_length: int = typer.Option(None, "--max-length", help="Max word pieces per window (BOS included); longer sentences are windowed, never truncated."),
    eval_every: int = typer.Option(None, "--eval-every", help="Also evaluate on dev (and checkpoint) every N optimizer steps; default once per epoch."),
    seed: int = typer.Option(None, "--seed", help="Seed (model init, LoRA init, data order, dropout)."),
    device: str = typer.Option(None, "--device", help="'auto', 'cpu' or 'cuda:N'."),
    column: str = typer.Option(None, "--column", help="HIPE tag column (default NE-COARSE-LIT)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from OUTPUT/checkpoint if present (same settings required)."),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice; 1 is fastest on a busy machine)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar with the training loss."),
    unit: str = typer.Option("sentence", "--unit", help="Training unit: sentence, segment or document (documents are windowed over word pieces, as the component reads pages)."),
):
    """LoRA fine-tuning of a token classifier on a Llama/Mistral base, selecting the best adapter on dev.

    Example: python -m spacy_ocrneurons train --base training/base --train assets/sample/sample-train-fr.tsv
    --dev assets/sample/sample-dev-fr.tsv --output training/lora --config configs/train.cfg
    """
    from .training import load_sentences, load_train_config, train_token_classifier

    try:
        overrides = {
            "train_on": train_on, "bidirectional": bidirectional, "epochs": epochs, "batch_size": batch_size,
            "lr": lr, "weight_decay": weight_decay, "lora_r": lora_r, "lora_alpha": lora_alpha,
            "lora_dropout": lora_dropout, "max_length": max_length, "eval_every": eval_every, "seed": seed,
            "device": device, "column": column,
            "target_modules": [m.strip() for m in target_modules.split(",") if m.strip()] if target_modules else None,
        }
        settings = load_train_config(config or None, overrides)
        col = settings.pop("column")
        if threads:
            import torch

            torch.set_num_threads(threads)
        train_data = load_sentences(train, col, unit=unit)
        dev_data = load_sentences(dev, col, unit=unit)
        noisy_data = load_sentences(noisy_train, col, unit=unit) if noisy_train else None
        result = train_token_classifier(base, train_data, dev_data, output, noisy_train_data=noisy_data,
                                        resume=resume, progress=progress, **settings)
    except (ValueError, FileNotFoundError, OSError) as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(code=1)
    best = result.best
    typer.echo(f"Best dev F1 {best.get('dev_f1', 0.0):.4f} at step {best.get('step')} (epoch {best.get('epoch', 0):.2f}) "
               f"-> {result.best_dir}; last -> {result.last_dir}; metrics -> {result.output_dir / 'metrics.json'}")
    if not result.finished:
        typer.echo("Stopped before the end of the schedule; run the same command again to resume.")


# --- identification and evaluation commands -------------------------------------------------

def _split_csv(value: str) -> list:
    return [v.strip() for v in value.split(",") if v.strip()]


@app.command("evaluate")
def evaluate_cmd(
    base: str = typer.Option(..., "--base", help="Base model directory (HF checkpoint) or merged model."),
    adapter: str = typer.Option(None, "--adapter", help="LoRA adapter directory (with labels.json); omit for a merged/plain checkpoint."),
    ranking: list[str] = typer.Option(..., "--ranking", help="Neuron ranking: the summary JSON or stats .npz of `identify`, a ranking JSON (layer -> neurons in rank order), or repeat with one profile file per k."),
    dev: list[str] = typer.Option(..., "--dev", help="Dev set NAME=PATH (HIPE TSV or .spacy), repeatable: --dev clean=corpus/dev.tsv --dev medium=corpus/dev-noise-medium.tsv. Selection is made on these."),
    test: list[str] = typer.Option(..., "--test", help="Test set NAME=PATH, repeatable. Read only after the setting is chosen on dev."),
    k: str = typer.Option(None, "--k", help="Neurons per layer: '1,2,4,8', '100:11000:100' (inclusive) or fractions of the MLP width '0.01,0.05'. Default: the paper's 100..11000 step 100 for wide MLPs, powers of two for tiny ones; with profile files, their k."),
    factors: str = typer.Option("0.1,0.5,0.9", "--factors", help="Scaling factors to sweep (comma-separated)."),
    layer_ranges: str = typer.Option("all", "--layer-ranges", help="Layer ranges to sweep, comma-separated: 'all', 'N', 'A-B', 'A-', 'lastN', unions 'A-B+C-D'; clipped to the model's depth."),
    select_on: str = typer.Option("noisy", "--select-on", help="Dev sets whose mean micro-F1 selects the setting: 'noisy' (all but clean), 'all', or names 'clean,medium'."),
    output: str = typer.Option("metrics", "--output", help="Output directory: results.json, results.md, predictions/<split>-<noise>-<system>.tsv."),
    plots: str = typer.Option("plots", "--plots", help="Directory for f1_vs_k_factor<F>.png."),
    profile_out: str = typer.Option("profiles/chosen.json", "--profile-out", help="Where to save the chosen profile (its random control goes next to it as *-random.json)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random-neuron control."),
    dev_random_control: bool = typer.Option(False, "--dev-random-control/--no-dev-random-control", help="Also score the random control of every setting on dev (doubles the sweep; adds dashed lines to the plots)."),
    extra_row: list[str] = typer.Option([], "--extra-row", help="Extra table row NAME=PATH.json from `evaluate-spacy`, e.g. 'spaCy CNN=metrics/spacy_cnn.json'."),
    statistic: str = typer.Option(None, "--statistic", help="Ranking statistic when --ranking is identify output (default: the one identify used)."),
    rank_mode: str = typer.Option(None, "--rank-mode", help="Identify mode whose statistics rank the neurons ('context' or 'isolated'; default: identify's)."),
    unit: str = typer.Option("document", "--unit", help="Evaluation unit: 'document', 'segment' or 'sentence' (entities never cross units)."),
    column: str = typer.Option("NE-COARSE-LIT", "--column", help="HIPE column holding the gold tags."),
    max_length: int = typer.Option(512, "--max-length", help="Window length in word pieces."),
    stride: int = typer.Option(64, "--stride", help="Window overlap in word pieces."),
    batch_size: int = typer.Option(4096, "--batch-size", help="Token budget per forward pass."),
    device: str = typer.Option("auto", "--device", help="'auto', 'cpu' or 'cuda:N'."),
    dtype: str = typer.Option("auto", "--dtype", help="'auto', 'float32', 'bfloat16' or 'float16'."),
    merge: bool = typer.Option(True, "--merge/--no-merge", help="Merge the LoRA adapter before the sweep (hooks work either way)."),
):
    """Sweep k x factor x layer range on dev (one loaded model, hook-based profiles), choose on dev, report on test.

    Reports strict seqeval micro-F1 (and per type) for the baseline, the chosen neutralization and a random-neuron
    control on the clean test set and each noise level; writes HIPE TSV predictions for the official HIPE scorer.
    """
    import logging

    from .evaluation import evaluate, parse_named_paths

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = evaluate(
            base, adapter, ranking, parse_named_paths(dev, "--dev"), parse_named_paths(test, "--test"),
            device=device, dtype=dtype, merge=merge, ks=k, factors=[float(f) for f in _split_csv(factors)],
            layer_ranges=_split_csv(layer_ranges), select_on=select_on, output_dir=output, plots_dir=plots,
            profile_out=profile_out, seed=seed, dev_random_control=dev_random_control, extra_rows=extra_row,
            ranking_statistic=statistic, rank_mode=rank_mode, unit=unit, column=column, max_length=max_length,
            stride=stride, batch_size=batch_size,
        )
    except (ValueError, FileNotFoundError) as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(code=1)
    chosen = result["chosen"]
    typer.echo(f"Chosen on dev: k={chosen['k']} factor={chosen['factor']:g} layers={chosen['layers']} "
               f"(dev {chosen['dev_selection_score']:.4f} vs baseline {chosen['dev_baseline_selection_score']:.4f})")
    for system, scores in result["test"].items():
        typer.echo(f"test {system:>15}: " + "  ".join(f"{n} {s['f1']:.4f}" for n, s in scores.items()))
    typer.echo(f"Wrote {output}/results.json, {output}/results.md and {result['predictions']}/")


@app.command("evaluate-spacy")
def evaluate_spacy_cmd(
    pipeline: str = typer.Option(..., "--pipeline", help="A spaCy pipeline directory (e.g. spaCy's CNN ner from `spacy train`)."),
    test: list[str] = typer.Option([], "--test", help="Test set NAME=PATH (HIPE TSV or .spacy), repeatable."),
    dev: list[str] = typer.Option([], "--dev", help="Dev set NAME=PATH, repeatable (optional)."),
    output: str = typer.Option(..., "--output", help="JSON file to write (same keys as results.json: test/dev -> noise -> scores)."),
    name: str = typer.Option("spaCy pipeline", "--name", help="System name (table row and prediction file names)."),
    predictions: str = typer.Option(None, "--predictions", help="Directory for HIPE TSV predictions <split>-<noise>-<name>.tsv."),
    unit: str = typer.Option("document", "--unit", help="Evaluation unit: 'document', 'segment' or 'sentence'."),
    column: str = typer.Option("NE-COARSE-LIT", "--column", help="HIPE column holding the gold tags."),
):
    """Score any spaCy pipeline's entities on HIPE files with the same strict seqeval procedure as `evaluate`."""
    from .evaluation import evaluate_pipeline, parse_named_paths

    if not test and not dev:
        typer.echo("Error: pass at least one --test NAME=PATH or --dev NAME=PATH.", err=True)
        raise typer.Exit(code=1)
    try:
        result = evaluate_pipeline(pipeline, {"dev": parse_named_paths(dev, "--dev"), "test": parse_named_paths(test, "--test")},
                                   name=name, output=output, predictions_dir=predictions, unit=unit, column=column)
    except (ValueError, FileNotFoundError, OSError) as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(code=1)
    for split in ("dev", "test"):
        for noise, s in result.get(split, {}).items():
            typer.echo(f"{split} {noise}: P {s['precision']:.4f} R {s['recall']:.4f} F1 {s['f1']:.4f}")
    typer.echo(f"Wrote {output}")


@app.command("identify")
def identify_cmd(
    base: str = typer.Option(..., "--base", help="Base model directory (HF checkpoint) or merged model."),
    adapter: str = typer.Option(None, "--adapter", help="LoRA adapter directory (with labels.json); merged before identification."),
    clean: str = typer.Option(None, "--clean", help="Clean data (HIPE .tsv or .spacy): noisy copies are made with the noise module."),
    noisy: str = typer.Option(None, "--noisy", help="Precomputed noisy copy of --clean: the .spacy written by `ocrneurons noise` (it stores the token alignment; a noisy HIPE .tsv does not and is refused). Omit to make the noise here with the same per-sentence seeds."),
    pairs: str = typer.Option(None, "--pairs", help="Precomputed aligned clean/noisy sentence pairs (.jsonl from --save-pairs) instead of --clean."),
    noise_level: str = typer.Option("medium", "--noise-level", help="Noise level for --clean: low, medium or high."),
    noise_method: str = typer.Option("nlpaug", "--noise-method", help="Noise method for --clean: nlpaug or typed."),
    seed: int = typer.Option(0, "--seed", help="Seed of the noise, the CKA subsample and the random-neuron control."),
    k: str = typer.Option("10,50,100", "--k", help="Neurons per layer, one profile each: '10,50,100', or fractions of the MLP width '0.01' / '1%'."),
    output_profiles: str = typer.Option("profiles", "--output-profiles", help="Directory for <name>-k<K>.json and <name>-k<K>-random.json."),
    name: str = typer.Option("ocr-sensitive", "--name", help="Profile file name prefix."),
    metrics: str = typer.Option("metrics/identify.json", "--metrics", help="Summary JSON: per-layer CKA (both modes), pair counts, sensitive-neuron counts, paths."),
    stats: str = typer.Option(None, "--stats", help="Per-layer per-neuron statistics (.npz; summaries, no raw activations). Default: <metrics stem>_stats.npz next to --metrics."),
    plots: str = typer.Option("plots", "--plots", help="Directory for cka_by_layer.png and sensitive_neurons_by_layer.png."),
    layers: str = typer.Option("all", "--layers", help="Layers to analyse: 'all' or ranges '0-5,25-31'."),
    site: str = typer.Option("mlp.up_proj", "--site", help="Where activations are read and neurons scaled: mlp.up_proj or mlp.gate_proj."),
    statistic: str = typer.Option("mean_abs_diff", "--statistic", help="Ranking statistic: mean_abs_diff, abs_mean_diff, t_stat, outlier_rate, activation_rate_diff, flip_rate."),
    modes: str = typer.Option("context,isolated", "--modes", help="Which runs: 'context' (whole sentences), 'isolated' (each word alone, as in the paper), or both."),
    rank_mode: str = typer.Option("context", "--rank-mode", help="Mode whose statistics rank the neurons."),
    pooling: str = typer.Option("mean", "--pooling", help="Word vector from its pieces: mean, first or last."),
    z: float = typer.Option(2.0, "--z", help="Outlier threshold: |d_j| > mean + z*std of |d| over the layer's neurons, per pair."),
    factor: float = typer.Option(0.5, "--factor", help="Scaling factor stored in the profiles."),
    cka_max_dim: int = typer.Option(1024, "--cka-max-dim", help="CKA on at most this many neurons per layer (0 = all; 14336^2 float64 is 1.6 GB per matrix)."),
    cka_method: str = typer.Option("subsample", "--cka-method", help="How wide layers are reduced for CKA: subsample (seeded neurons) or projection (seeded Gaussian)."),
    max_sentences: int = typer.Option(0, "--max-sentences", help="Use at most this many sentences (0 = all)."),
    save_pairs_to: str = typer.Option(None, "--save-pairs", help="Write the clean/noisy pairs used (.jsonl) for reuse with --pairs."),
    column: str = typer.Option("NE-COARSE-LIT", "--column", help="HIPE column with the tags (passed to the noise module)."),
    max_length: int = typer.Option(512, "--max-length", help="Window length in word pieces (longer sentences are windowed)."),
    stride: int = typer.Option(64, "--stride", help="Window overlap in word pieces."),
    batch_size: int = typer.Option(4096, "--batch-size", help="Token budget per forward pass."),
    device: str = typer.Option("auto", "--device", help="'auto', 'cpu' or 'cuda:N'."),
    dtype: str = typer.Option("auto", "--dtype", help="'auto', 'float32', 'bfloat16' or 'float16'."),
):
    """Find OCR-sensitive MLP neurons per layer from clean/noisy word pairs; write top-k profiles, random controls,
    statistics, per-layer CKA and plots.

    Runs the fine-tuned model (no profile) on whole clean and noisy sentences (in context) and on isolated words,
    gathers the site output at the altered words' pieces (mean over pieces, never padding or BOS), keeps streaming
    per-neuron statistics and linear CKA, and ranks neurons per layer by --statistic.
    """
    from pathlib import Path

    from . import identify as ident
    from .architectures import decoder_layers
    from .modeling import load_token_classifier

    if bool(clean) == bool(pairs) or (noisy and not clean):
        typer.echo("Error: pass either --clean (with optional --noisy) or --pairs (precomputed pairs).", err=True)
        raise typer.Exit(code=1)
    try:
        if pairs:
            sentence_pairs = ident.load_pairs(pairs)
            data, noise = str(pairs), "precomputed pairs"
        else:
            sentence_pairs = ident.read_aligned_pairs(clean, noisy, method=noise_method, level=noise_level, seed=seed,
                                                      column=column, progress=True)
            data = str(clean)
            noise = str(noisy) if noisy else f"{noise_method} {noise_level} seed={seed}"
        if max_sentences:
            sentence_pairs = sentence_pairs[:max_sentences]
        if save_pairs_to:
            ident.save_pairs(sentence_pairs, save_pairs_to)
        loaded = load_token_classifier(base, adapter, device=device, dtype=dtype, merge=True)
        layer_list = ident.parse_layers(layers, len(decoder_layers(loaded.model)))
        stats_path = stats or str(Path(metrics).with_name(Path(metrics).stem + "_stats.npz"))
        summary = ident.identify(
            loaded, sentence_pairs, k, site=site, layers=layer_list, modes=[m.strip() for m in modes.split(",") if m.strip()],
            rank_mode=rank_mode, statistic=statistic, pooling=pooling, z=z, batch_size=batch_size, max_length=max_length,
            stride=stride, cka_max_dim=cka_max_dim or None, cka_method=cka_method, seed=seed, factor=factor, name=name,
            profiles_dir=output_profiles, metrics_path=metrics, plots_dir=plots, stats_path=stats_path,
            provenance={"data": data, "noise": noise, "base": base, "adapter": adapter},
        )
    except (ValueError, FileNotFoundError, OSError, KeyError) as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(code=1)
    typer.echo(f"{summary['n_pairs']} clean/noisy word pairs from {summary['n_sentences']} sentences; "
               f"ranked by {statistic} ({rank_mode}).")
    for mode, values in summary["cka"].items():
        typer.echo(f"CKA {mode}: " + " ".join(f"{l}:{'nan' if v is None else f'{v:.3f}'}" for l, v in values.items()))
    for entry in summary["profiles"]:
        typer.echo(f"k={entry['k']}: {entry['profile']} (control {entry['random_control']})")
    typer.echo(f"Wrote {metrics}, {stats_path} and plots in {plots}/")


# --- workflow commands (prepare-data, assemble) --------------------------------------------------


@app.command("prepare-data")
def prepare_data_cmd(
    dataset: str = typer.Option("sample", "--dataset", "-d", help="sample (embedded), hipe2020 or ajmc."),
    output: str = typer.Option("corpus", "--output", "-o", help="Folder for train.tsv, dev.tsv, test.tsv."),
    max_docs: int = typer.Option(0, "--max-docs", help="Keep only the first N documents of each split (0 = all)."),
):
    """Copy a dataset's HIPE TSV splits to corpus/{train,dev,test}.tsv (the workflow's fixed names)."""
    from .workflow import prepare_corpus

    written = prepare_corpus(dataset, output, max_docs=max_docs or None)
    for split, path in written.items():
        typer.echo(f"{split}: {path}")


@app.command("assemble")
def assemble_cmd(
    output: str = typer.Option(..., "--output", "-o", help="Pipeline directory to write."),
    model: str = typer.Option(..., "--model", help="Base checkpoint directory."),
    adapter: str = typer.Option(None, "--adapter", help="LoRA adapter directory (with labels.json)."),
    profile: str = typer.Option(None, "--profile", help="Neutralization profile JSON (omit for none)."),
    factor: float = typer.Option(None, "--factor", help="Override the profile's factor."),
    lang: str = typer.Option("fr", "--lang", help="spaCy language of the blank pipeline."),
    include_base: bool = typer.Option(True, "--include-base/--reference-base",
                                      help="Copy the base checkpoint into the pipeline (self-contained) or reference it by path."),
):
    """Build a spacy.load-able pipeline with the ocrneurons_ner component and (optionally) a profile."""
    from .workflow import assemble_pipeline

    out = assemble_pipeline(output, model, adapter, profile, factor, lang=lang, include_base=include_base)
    typer.echo(f"Pipeline written to {out}; load it with spacy.load({str(out)!r}).")


# --- archive commands (annotate) -------------------------------------------------------------
from typing import List as _List, Optional as _Optional  # noqa: E402


@app.command(
    "annotate",
    help=(
        "Annotate digitized archives with a spaCy pipeline: every input document yields exactly one record "
        "(its entities with character offsets, label, text, confidence and, for ALTO/PAGE, the source word ids, "
        "boxes and OCR confidences) or an error record with the reason.\n\n"
        "INPUT is any mix of files, folders (walked recursively, sorted; files ending in .txt .text .jsonl "
        ".ndjson .xml .alto) and glob patterns (quote them). Formats are detected from the extension and the "
        "content (ALTO <alto>, PAGE <PcGts>, JSONL, plain text) unless --format is given.\n\n"
        "Output: shards records-NNNNN.jsonl / docs-NNNNN.spacy / hipe-NNNNN.tsv written atomically, "
        "manifest.jsonl (committed document keys; --resume skips them after a crash or kill -9), run.json and "
        "summary.json (counts of done, failed and skipped documents).\n\n"
        "Example: ocrneurons annotate 'scans/**/*.xml' corpus.jsonl --pipeline my_pipeline --output out "
        "--output-format jsonl,hipe --n-process 2"
    ),
)
def annotate_command(
    inputs: _List[str] = typer.Argument(..., metavar="INPUT...", help="Files, folders or glob patterns."),
    pipeline: str = typer.Option(..., "--pipeline", "-p", help="A spacy.load-able pipeline: a folder written by nlp.to_disk (normally with the ocrneurons_ner component) or an installed package."),
    output: str = typer.Option(..., "--output", "-o", help="Output folder (created if needed)."),
    input_format: str = typer.Option("auto", "--format", "-f", help="Input format: auto, text (one document per file), jsonl (one object per line with 'id', 'text' and optional metadata), alto (ALTO XML v2-v4) or page (PAGE XML)."),
    output_format: str = typer.Option("jsonl", "--output-format", "-t", help="Comma-separated output formats: jsonl, docbin (spaCy DocBin with source words in doc.user_data), hipe (HIPE-2022 TSV)."),
    engine: str = typer.Option("local", "--engine", "-e", help="local (this machine, --n-process workers) or ray (Ray Data; attaches to the cluster in RAY_ADDRESS, else starts a local one). Needs: pip install spacy-ocrneurons[ray]."),
    n_process: int = typer.Option(1, "--n-process", "-n", help="Local engine: number of worker processes (each loads the pipeline once)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Documents per nlp.pipe batch (batches are length-sorted)."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Documents per output shard (the unit of atomic commit and of resume)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed or crashed job in the same --output: documents listed in its manifest are skipped, uncommitted partial shards are discarded."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete previous results (shards, manifest, summary) in --output and start over."),
    max_bytes: int = typer.Option(50 * 1024 * 1024, "--max-bytes", help="Larger files (or JSONL lines) become error records instead of being read."),
    encoding: str = typer.Option("utf-8", "--encoding", help="Encoding of text and JSONL inputs; undecodable documents become error records."),
    include_text: bool = typer.Option(False, "--include-text", help="Also write each document's text in its JSONL record."),
    code: _Optional[str] = typer.Option(None, "--code", help="Python file to import first (registers custom pipeline components)."),
    num_gpus: float = typer.Option(0.0, "--num-gpus", help="Ray engine: GPUs per model actor (e.g. 1, or 0.5 to share a GPU)."),
    ray_actors: int = typer.Option(0, "--ray-actors", help="Ray engine: number of model actors (0: one per GPU with --num-gpus, else CPUs - 1)."),
    ray_address: _Optional[str] = typer.Option(None, "--ray-address", help="Ray engine: cluster address (default: RAY_ADDRESS, else a new local cluster)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (documents, words/s, ETA)."),
    count: bool = typer.Option(True, "--count/--no-count", help="Count the documents first so that the progress bar shows an ETA."),
):
    from spacy_ocrneurons.archives import ArchiveError, annotate_archives

    formats = [f.strip() for f in output_format.split(",") if f.strip()]
    ray_options = {"num_gpus": num_gpus, "actors": ray_actors, "address": ray_address}
    try:
        annotate_archives(
            inputs, pipeline, output,
            input_format=None if input_format == "auto" else input_format,
            output_formats=formats, engine=engine, n_process=n_process, batch_size=batch_size,
            shard_size=shard_size, resume=resume, overwrite=overwrite, max_bytes=max_bytes,
            encoding=encoding, include_text=include_text, code=code, progress=progress, count=count,
            ray_options=ray_options, log=lambda m: typer.echo(m, err=True),
        )
    except ArchiveError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(2)
