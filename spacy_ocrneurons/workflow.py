"""Glue for the spaCy project workflow: pick a dataset's splits, and assemble a ``spacy.load``-able pipeline."""
import json
import shutil
from pathlib import Path
from typing import Dict, Optional, Union

PathLike = Union[str, Path]

#: Where each dataset's HIPE TSV files live under ``assets/`` (the sample is committed; the others are fetched).
DATASETS = {
    "sample": "assets/sample",
    "hipe2020": "assets/hipe2020/fr",
    "ajmc": "assets/ajmc/fr",
}
SPLITS = ("train", "dev", "test")


def find_split_files(dataset: str, assets_root: PathLike = ".") -> Dict[str, Path]:
    """The train/dev/test TSV files of ``dataset`` (one file per split, matched by ``-{split}-`` in the name)."""
    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}.")
    folder = Path(assets_root) / DATASETS[dataset]
    if not folder.is_dir():
        hint = "" if dataset == "sample" else " Run `spacy project assets --extra` or `python -m spacy_ocrneurons fetch-shared-data`."
        raise FileNotFoundError(f"Dataset {dataset!r}: folder {folder} not found.{hint}")
    found = {}
    for split in SPLITS:
        matches = sorted(p for p in folder.glob("*.tsv") if f"-{split}-" in p.name)
        if len(matches) != 1:
            raise FileNotFoundError(f"Dataset {dataset!r}: expected one '*-{split}-*.tsv' file in {folder}, found {len(matches)}.")
        found[split] = matches[0]
    return found


def prepare_corpus(dataset: str, output: PathLike = "corpus", assets_root: PathLike = ".",
                   max_docs: Optional[int] = None) -> Dict[str, Path]:
    """Copy the dataset's splits to ``corpus/{train,dev,test}.tsv`` (optionally only the first ``max_docs`` documents
    of each split, for quick runs; the count is recorded in ``corpus/prepare.json``)."""
    from .hipe import read_hipe_tsv, write_hipe_tsv

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    report = {"dataset": dataset, "max_docs": max_docs, "splits": {}}
    for split, path in find_split_files(dataset, assets_root).items():
        target = out / f"{split}.tsv"
        if max_docs is None:
            shutil.copyfile(path, target)
            docs = read_hipe_tsv(target)
        else:
            docs = read_hipe_tsv(path)[:max_docs]
            write_hipe_tsv(docs, target)
        report["splits"][split] = {"source": str(path), "documents": len(docs)}
        written[split] = target
    (out / "prepare.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf8")
    return written


def assemble_pipeline(output: PathLike, model: PathLike, adapter: Optional[PathLike] = None,
                      profile: Optional[PathLike] = None, factor: Optional[float] = None, lang: str = "fr",
                      include_base: bool = True, name: str = "ocrneurons_ner_pipeline") -> Path:
    """Build and save a pipeline directory: ``spacy.blank(lang)`` + ``ocrneurons_ner`` (+ profile)."""
    import spacy

    nlp = spacy.blank(lang)
    nlp.meta["name"] = name
    nlp.add_pipe("ocrneurons_ner", config={
        "model": str(model), "adapter": str(adapter) if adapter else None,
        "profile": str(profile) if profile else None, "factor": factor, "include_base": include_base,
    })
    nlp.get_pipe("ocrneurons_ner").loaded  # noqa: B018  (fail now, not at first use, if anything is missing)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    nlp.to_disk(out)
    return out
