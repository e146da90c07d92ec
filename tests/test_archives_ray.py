"""``ocrneurons annotate --engine ray`` on a small local Ray cluster (skipped without Ray)."""
import json

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
spacy = pytest.importorskip("spacy")

from spacy_ocrneurons import archives as A  # noqa: E402

from .test_archives import FIXTURES, _save_pipeline  # noqa: E402  (same fixtures and entity-ruler pipeline)

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return _save_pipeline(tmp_path_factory.mktemp("ray_pipeline") / "ruler_fr")


def test_ray_engine_matches_local_engine(local_ray, pipeline, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in FIXTURES.iterdir():
        (corpus / f.name).write_bytes(f.read_bytes())
    with open(corpus / "more.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"id": f"m{i}", "text": f"Lettre {i} de Victor Hugo à Lyon." * (1 + i % 3)}) + "\n")
    kw = dict(output_formats=["jsonl", "hipe", "docbin"], progress=False, shard_size=7, batch_size=4)
    local = tmp_path / "local"
    A.annotate_archives([str(corpus)], pipeline, str(local), **kw)
    out = tmp_path / "ray"
    s = A.annotate_archives([str(corpus)], pipeline, str(out), engine="ray",
                            ray_options={"actors": 1, "window": 25}, **kw)
    assert s["engine"] == "ray" and s["done"] + s["failed"] == 54 and s["failed"] == 6
    # identical shards: same records, same order, same HIPE and DocBin contents
    for name in sorted(p.name for p in local.iterdir() if A._SHARD_RE.match(p.name)):
        assert (out / name).read_bytes() == (local / name).read_bytes(), name
    # resume on Ray: everything is skipped, nothing duplicated
    s = A.annotate_archives([str(corpus)], pipeline, str(out), engine="ray", resume=True,
                            ray_options={"actors": 1}, **kw)
    assert (s["done"], s["failed"], s["skipped"]) == (0, 0, 54)
    keys = [r["key"] for r in A.read_records(str(out))]
    assert len(keys) == len(set(keys)) == 54
