"""Ray Data engine for ``ocrneurons annotate --engine ray`` (optional extra ``[ray]``).

The job is the same as the local engine's (see :mod:`spacy_ocrneurons.archives`):

* the driver streams document descriptors (path, format, key, JSONL line bytes) in
  *waves* of ``window`` documents (bounded driver memory), each wave a
  ``ray.data.from_items`` dataset;
* a CPU stage (``map_batches`` with a plain function, Ray tasks) parses the documents
  (ALTO / PAGE / text / JSONL) into plain columns (``key``, ``parsed`` JSON);
* a model stage (``map_batches`` with the actor class :class:`AnnotateActor`,
  ``concurrency=actors``, ``num_gpus`` per actor) loads ``spacy.load(pipeline)`` once per
  actor and returns plain columns (``key``, ``status``, ``n_words``, ``record``, ``hipe``,
  ``doc``), never ``Doc`` objects;
* the driver consumes the results in order (``preserve_order``) and writes shards and the
  manifest exactly like the local engine, so ``--resume`` and the output are identical.

``ray.init()`` attaches to an existing cluster when ``RAY_ADDRESS`` (or ``--ray-address``) is
set, and starts a local one otherwise.  If Ray is already initialised (e.g. by a test or a
notebook), that instance is used.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, List, Optional

from .archives import ArchiveError, annotate_parsed, load_pipeline, parse_document, pipeline_info

COLUMNS = ("key", "status", "n_words", "record", "hipe", "doc")


def _require_ray():
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise ArchiveError(
            "--engine ray needs Ray Data: pip install 'spacy-ocrneurons[ray]' (or pip install 'ray[data]')"
        ) from None
    return ray


def init_ray(address: Optional[str] = None, **kwargs):
    """Attach to ``address`` / ``RAY_ADDRESS`` if given, else start a local Ray instance."""
    ray = _require_ray()
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, **kwargs)
    return ray


def parse_batch(batch, max_bytes: int, encoding: str):
    """CPU stage: descriptors (pyarrow table) -> ``key`` and ``parsed`` (JSON) columns."""
    import pyarrow as pa

    rows = batch.to_pylist()
    keys, parsed = [], []
    for d in rows:
        d["data"] = d.get("data") or b""
        p = parse_document(d, max_bytes, encoding)
        keys.append(p["key"])
        parsed.append(json.dumps(p, ensure_ascii=False))
    return pa.table({"key": pa.array(keys, pa.string()), "parsed": pa.array(parsed, pa.large_string())})


class AnnotateActor:
    """Model stage: loads the pipeline once per actor; returns plain columns."""

    def __init__(self, pipeline: str, code: Optional[str], opts: Dict[str, Any]):
        self.nlp = load_pipeline(pipeline, code)
        self.opts = opts
        self.pinfo = pipeline_info(self.nlp)

    def __call__(self, batch):
        import pyarrow as pa

        parsed = [json.loads(s) for s in batch.column("parsed").to_pylist()]
        results = annotate_parsed(
            self.nlp,
            parsed,
            batch_size=self.opts["batch_size"],
            want_hipe=self.opts["want_hipe"],
            want_docbin=self.opts["want_docbin"],
            include_text=self.opts["include_text"],
            pinfo=self.pinfo,
        )
        return pa.table({
            "key": pa.array([r["key"] for r in results], pa.string()),
            "status": pa.array([r["status"] for r in results], pa.string()),
            "n_words": pa.array([r["n_words"] for r in results], pa.int64()),
            "record": pa.array([r["record"] for r in results], pa.large_string()),
            "hipe": pa.array([r["hipe"] for r in results], pa.large_string()),
            "doc": pa.array([r["doc"] for r in results], pa.large_binary()),
        })


def _waves(descs: Iterator[Dict[str, Any]], window: int) -> Iterator[List[Dict[str, Any]]]:
    buf: List[Dict[str, Any]] = []
    for d in descs:
        buf.append(d)
        if len(buf) >= window:
            yield buf
            buf = []
    if buf:
        yield buf


def run_ray(
    descs: Iterator[Dict[str, Any]],
    pipeline: str,
    code: Optional[str],
    opts: Dict[str, Any],
    *,
    num_gpus: float = 0.0,
    actors: int = 0,
    address: Optional[str] = None,
    window: int = 50_000,
    parse_batch_size: int = 64,
    num_cpus_per_actor: float = 1.0,
) -> Iterator[List[Dict[str, Any]]]:
    """Yield lists of results (same dicts as the local engine), in input order."""
    ray = init_ray(address)
    import pyarrow as pa

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic shard contents
    try:
        ctx.enable_progress_bars = False
    except Exception:
        pass
    if actors <= 0:
        res = ray.cluster_resources()
        if num_gpus and num_gpus > 0:
            actors = max(1, int(res.get("GPU", 0) / num_gpus))
        else:
            actors = max(1, int(res.get("CPU", 1)) - 1)
    model_batch = max(1, opts["batch_size"] * 4)
    remote_args: Dict[str, Any] = {"num_cpus": num_cpus_per_actor}
    if num_gpus and num_gpus > 0:
        remote_args["num_gpus"] = num_gpus
    for wave in _waves(descs, window):
        table = pa.table({
            "key": pa.array([d["key"] for d in wave], pa.string()),
            "path": pa.array([d["path"] for d in wave], pa.string()),
            "rel": pa.array([d["rel"] for d in wave], pa.string()),
            "fmt": pa.array([d["fmt"] for d in wave], pa.string()),
            "line": pa.array([d["line"] for d in wave], pa.int64()),
            "data": pa.array([d["data"] for d in wave], pa.large_binary()),
            "error": pa.array([d["error"] for d in wave], pa.string()),
        })
        n_blocks = max(1, min(len(wave) // parse_batch_size, 4 * max(actors, 1) * 4))
        ds = ray.data.from_arrow(table).repartition(n_blocks)
        ds = ds.map_batches(
            parse_batch,
            batch_size=parse_batch_size,
            batch_format="pyarrow",
            fn_kwargs={"max_bytes": opts["max_bytes"], "encoding": opts["encoding"]},
            num_cpus=1,
        )
        ds = ds.map_batches(
            AnnotateActor,
            batch_size=model_batch,
            batch_format="pyarrow",
            fn_constructor_kwargs={"pipeline": pipeline, "code": code, "opts": opts},
            concurrency=actors,
            **remote_args,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            cols = {c: batch.column(c).to_pylist() for c in COLUMNS}
            yield [
                {c: cols[c][i] for c in COLUMNS}
                for i in range(batch.num_rows)
            ]
