"""Case index (round trip, incremental re-runs, atomic save, damage and mismatch errors), search, metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from CTFoundationLib import retrieval
from CTFoundationLib.errors import RetrievalError
from CTFoundationLib.retrieval import CaseIndex, CaseMetadata, map_at_k, recall_at_k, source_fingerprint

MODEL = "ct-clip-v2"
SHA_A = "a" * 64
SHA_B = "b" * 64
DIM = 16


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def random_units(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((n, dim)))


def meta(name: str, fingerprint: str = "fp1", labels: tuple[int, ...] | None = (0, 1, 0)) -> CaseMetadata:
    return CaseMetadata(f"/data/{name}.nii.gz", fingerprint, f"report of {name}", labels)


def new_index(folder: Path, n: int = 3, seed: int = 0) -> CaseIndex:
    index = CaseIndex.open_or_create(folder, model_id=MODEL, checkpoint_sha256=SHA_A, dim=DIM)
    for i, latent in enumerate(random_units(n, seed=seed)):
        index.add(f"case{i}", latent, meta(f"case{i}"))
    return index


# ---------------------------------------------------------------- index on disk

def test_round_trip_and_incremental_rerun(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    index = new_index(folder)
    index.save()
    reopened = CaseIndex.open(folder, model_id=MODEL, checkpoint_sha256=SHA_A)
    assert reopened.case_ids == ("case0", "case1", "case2")
    np.testing.assert_array_equal(reopened.latents, index.latents)
    assert reopened.latents.dtype == np.float32
    assert reopened.metadata("case1") == meta("case1")

    # A re-run: unchanged case skipped, changed case replaced in place, new case appended.
    rerun = CaseIndex.open_or_create(folder, model_id=MODEL, checkpoint_sha256=SHA_A, dim=DIM)
    assert rerun.contains("case0", "fp1")
    assert not rerun.contains("case1", "fp2")
    assert not rerun.contains("case9", "fp1")
    changed, added = random_units(2, seed=1)
    rerun.add("case1", 3.0 * changed, meta("case1", "fp2", labels=(1, 1, 0)))
    rerun.add("case3", added, meta("case3", labels=None))
    rerun.save()

    final = CaseIndex.open(folder)
    assert final.case_ids == ("case0", "case1", "case2", "case3")
    assert final.contains("case1", "fp2") and not final.contains("case1", "fp1")
    assert final.metadata("case1").labels == (1, 1, 0)
    assert final.metadata("case3").labels is None and final.metadata("case3").report == "report of case3"
    np.testing.assert_allclose(final.latents[1], changed, atol=1e-6)  # stored re-normalised
    np.testing.assert_array_equal(final.latents[[0, 2]], index.latents[[0, 2]])
    # Only the current generation's data files remain.
    assert sorted(p.name for p in folder.iterdir()) == ["cases.2.jsonl", "index.json", "latents.2.npy",
                                                        "text_latents.2.npy"]


def test_latents_are_renormalised_and_bad_latents_refused(tmp_path: Path) -> None:
    index = CaseIndex(tmp_path, MODEL, SHA_A, 3)
    index.add("x", [3.0, 0.0, 4.0], meta("x"))
    np.testing.assert_allclose(index.latents[0], [0.6, 0.0, 0.8], rtol=1e-6)
    for bad in ([0.0, 0.0, 0.0], [np.nan, 1.0, 0.0], [1.0, 0.0], [[1.0, 0.0, 0.0]]):
        with pytest.raises(RetrievalError):
            index.add("y", bad, meta("y"))
    with pytest.raises(RetrievalError, match="0/1"):
        index.add("y", [1.0, 0.0, 0.0], meta("y", labels=(0, 2, 1)))
    assert index.case_ids == ("x",)


def test_metadata_stored_as_plain_types(tmp_path: Path) -> None:
    index = CaseIndex(tmp_path, MODEL, SHA_A, 3)
    row = np.array([[0, 1, 1]], dtype=np.uint8)[0]
    index.add("x", [1.0, 0.0, 0.0], CaseMetadata(tmp_path / "x.nrrd", "fp", None, row))  # type: ignore[arg-type]
    index.save()
    stored = CaseIndex.open(tmp_path).metadata("x")
    assert stored == CaseMetadata(str(tmp_path / "x.nrrd"), "fp", None, (0, 1, 1))
    assert all(type(v) is int for v in stored.labels)


def test_labels_matrix(tmp_path: Path) -> None:
    index = new_index(tmp_path)
    np.testing.assert_array_equal(index.labels(), [[0, 1, 0]] * 3)
    index.add("case3", random_units(1, seed=5)[0], meta("case3", labels=None))
    with pytest.raises(RetrievalError, match="no labels"):
        index.labels()


def _fail(*_args: object, **_kwargs: object) -> None:
    raise OSError("simulated crash")


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "index"
    index = new_index(folder)
    index.save()
    before = index.latents
    index.add("case9", random_units(1, seed=3)[0], meta("case9"))

    # Crash after the new data files are written, before the manifest is swapped in.
    with monkeypatch.context() as patch:
        patch.setattr(retrieval.os, "replace", _fail)
        with pytest.raises(OSError, match="simulated"):
            index.save()
    old = CaseIndex.open(folder)
    assert old.case_ids == ("case0", "case1", "case2")
    np.testing.assert_array_equal(old.latents, before)

    # Crash half-way through writing a data file (truncated bytes on disk).
    real_write = retrieval._write_synced

    def half_write(path: Path, data: bytes) -> str:
        real_write(path, data[: len(data) // 2])
        raise OSError("simulated crash")

    with monkeypatch.context() as patch:
        patch.setattr(retrieval, "_write_synced", half_write)
        with pytest.raises(OSError, match="simulated"):
            index.save()
    assert CaseIndex.open(folder).case_ids == ("case0", "case1", "case2")

    index.save()  # a later save succeeds and clears the leftovers of the crashed ones
    assert CaseIndex.open(folder).case_ids == ("case0", "case1", "case2", "case9")
    assert sorted(p.name for p in folder.iterdir()) == ["cases.2.jsonl", "index.json", "latents.2.npy",
                                                        "text_latents.2.npy"]


def test_missing_or_damaged_index(tmp_path: Path) -> None:
    with pytest.raises(RetrievalError, match="no case index"):
        CaseIndex.open(tmp_path / "nowhere")
    folder = tmp_path / "index"
    new_index(folder).save()
    manifest = json.loads((folder / "index.json").read_text())

    latents = folder / manifest["latents_file"]
    good = latents.read_bytes()
    latents.write_bytes(good[:-8])
    with pytest.raises(RetrievalError, match="checksum"):
        CaseIndex.open(folder)
    latents.unlink()
    with pytest.raises(RetrievalError, match="cannot be read"):
        CaseIndex.open(folder)
    latents.write_bytes(good)

    cases = folder / manifest["cases_file"]
    cases.write_text(cases.read_text().replace('"case1"', '"case0"'))
    with pytest.raises(RetrievalError, match="checksum"):
        CaseIndex.open(folder)

    (folder / "index.json").write_text("{ not json")
    with pytest.raises(RetrievalError, match="unreadable"):
        CaseIndex.open(folder)
    (folder / "index.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(RetrievalError, match="version 99"):
        CaseIndex.open(folder)
    (folder / "index.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(RetrievalError, match="not a CTFoundation case index"):
        CaseIndex.open(folder)


def test_model_and_width_mismatch_refused(tmp_path: Path) -> None:
    new_index(tmp_path).save()
    with pytest.raises(RetrievalError, match="not comparable"):
        CaseIndex.open(tmp_path, checkpoint_sha256=SHA_B)
    with pytest.raises(RetrievalError, match="not comparable"):
        CaseIndex.open_or_create(tmp_path, model_id="other-model", checkpoint_sha256=SHA_A, dim=DIM)
    with pytest.raises(RetrievalError, match="16-d latents, not 512-d"):
        CaseIndex.open_or_create(tmp_path, model_id=MODEL, checkpoint_sha256=SHA_A)
    index = CaseIndex.open(tmp_path, model_id=MODEL, checkpoint_sha256=SHA_A.upper())
    with pytest.raises(RetrievalError, match=r"\(16,\) latents"):
        index.add("wide", np.ones(512), meta("wide"))
    with pytest.raises(RetrievalError, match="64 hex"):
        CaseIndex(tmp_path, MODEL, "not-a-sha", DIM)


def test_source_fingerprint(tmp_path: Path) -> None:
    file = tmp_path / "ct.nii.gz"
    file.write_bytes(b"1234")
    first = source_fingerprint(file)
    assert first == source_fingerprint(file)
    file.write_bytes(b"12345")
    assert source_fingerprint(file) != first

    series = tmp_path / "dicom"
    series.mkdir()
    (series / "1.dcm").write_bytes(b"a")
    before = source_fingerprint(series)
    os.utime(series / "1.dcm", ns=(1, 1))
    touched = source_fingerprint(series)
    assert touched != before
    (series / "2.dcm").write_bytes(b"b")
    assert source_fingerprint(series) not in (before, touched)
    with pytest.raises(RetrievalError, match="no such file"):
        source_fingerprint(tmp_path / "missing")


# ---------------------------------------------------------------- search

def test_search_equals_brute_force(tmp_path: Path) -> None:
    cases = random_units(300, seed=1)
    index = CaseIndex(tmp_path, MODEL, SHA_A, DIM)
    for i, latent in enumerate(cases):
        index.add(f"c{i}", latent * (i + 1), meta(f"c{i}"))  # any scale: cosine is what counts
    queries = np.random.default_rng(2).standard_normal((7, DIM)) * 5.0
    expected = unit(queries) @ cases.T  # float64 cosine
    batch = index.search_batch(queries, 10)
    for query, row, hits in zip(queries, expected, batch):
        order = np.argsort(-row)[:10]
        assert [h.case_id for h in hits] == [f"c{j}" for j in order]
        np.testing.assert_allclose([h.score for h in hits], row[order], atol=1e-5)
        single = index.search(query, 10)  # same hits; scores may differ in the last float32 bit (gemv vs gemm)
        assert [h.case_id for h in single] == [h.case_id for h in hits]
        np.testing.assert_allclose([h.score for h in single], [h.score for h in hits], atol=1e-6)
    assert batch[0][0].metadata == meta(batch[0][0].case_id)
    assert len(index.search(queries[0], 1000)) == 300


def test_search_exclude_self(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retrieval, "_ROW_BLOCK", 1)  # each query in its own block: exclusions must follow it
    cases = random_units(50, seed=4)
    index = CaseIndex(tmp_path, MODEL, SHA_A, DIM)
    for i, latent in enumerate(cases):
        index.add(f"c{i}", latent, meta(f"c{i}"))
    assert index.search(cases[7], 1)[0].case_id == "c7"  # a case is its own nearest neighbour
    hits = index.search(cases[7], 5, exclude="c7")
    scores = cases @ cases[7]
    scores[7] = -np.inf
    assert [h.case_id for h in hits] == [f"c{j}" for j in np.argsort(-scores)[:5]]
    both = index.search_batch(cases[[7, 8]], 49, exclude=["c7", {"c8", "c0", "unknown"}])
    assert len(both[0]) == 49 and "c7" not in {h.case_id for h in both[0]}
    assert len(both[1]) == 48 and not {"c8", "c0"} & {h.case_id for h in both[1]}
    with pytest.raises(RetrievalError, match="exclude entries"):
        index.search_batch(cases[[7, 8]], 3, exclude=["c7"])
    with pytest.raises(RetrievalError, match="expected"):
        index.search(np.ones(DIM + 1), 3)


def test_search_ties_go_to_lower_row(tmp_path: Path) -> None:
    index = CaseIndex(tmp_path, MODEL, SHA_A, 2)
    for name, latent in (("a", [0.0, 1.0]), ("b", [1.0, 0.0]), ("c", [1.0, 0.0]), ("d", [2.0, 0.0])):
        index.add(name, latent, meta(name))
    assert [h.case_id for h in index.search([1.0, 0.0], 4)] == ["b", "c", "d", "a"]
    # 300 cases on 5 directions, in random order: long runs of exact ties that an unstable sort would shuffle.
    directions = np.random.default_rng(3).integers(0, 5, 300)
    many = CaseIndex(tmp_path, MODEL, SHA_A, 2)
    for i, d in enumerate(directions):
        many.add(f"t{i}", _angles(20.0 * d)[0], meta(f"t{i}"))
    expected = [f"t{i}" for i in sorted(range(300), key=lambda i: directions[i])]  # stable: lower index first
    assert [h.case_id for h in many.search([1.0, 0.0], 300)] == expected
    assert [h.case_id for h in many.search([1.0, 0.0], 150)] == expected[:150]
    assert [h.case_id for h in many.search([1.0, 0.0], 150, exclude="t0")] == [c for c in expected if c != "t0"][:150]


# ---------------------------------------------------------------- metrics

def test_recall_hand_computed() -> None:
    # Volumes are the 4 basis vectors, so report i's score for volume j is its j-th entry (after scaling).
    images = np.eye(4)
    texts = np.array([
        [4, 3, 2, 1],  # own volume 0 scores highest: rank 0
        [2, 2, 0, 0],  # tie with volume 0, which has the lower index and goes first: rank 1
        [0, 0, 1, 1],  # tie with volume 3; own volume 2 has the lower index: rank 0
        [4, 3, 2, 1],  # own volume 3 scores lowest: rank 3
    ], dtype=float)
    # ranks (0, 1, 0, 3): R@1 = 2/4, R@2 = 3/4, R@3 = 3/4, R@4 = 4/4
    assert recall_at_k(texts, images, ks=(1, 2, 3, 4)) == {1: 0.5, 2: 0.75, 3: 0.75, 4: 1.0}
    with pytest.raises(RetrievalError, match="K = 5 needs at least 5 volumes"):
        recall_at_k(texts, images, ks=(5,))
    with pytest.raises(RetrievalError, match="one volume per report"):
        recall_at_k(texts, images[:3], ks=(1,))


def _angles(*degrees: float) -> np.ndarray:
    radians = np.deg2rad(degrees)
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


def test_map_hand_computed() -> None:
    # Volumes on the unit circle at 0, 30, 90, 10 degrees: cos(A,B)=.87 cos(A,C)=0 cos(B,C)=.5
    # cos(D,A)=.98 cos(D,B)=.94 cos(D,C)=.17. D has no positive label, so it is a query but not a candidate.
    latents = _angles(0, 30, 90, 10)
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1], [0, 0, 0]])
    # Jaccard: J(A,B)=1/2, J(A,C)=0, J(B,C)=1/3, J(D,*)=0, J(X,X)=1.
    # Query excluded: A -> B, C: (1/2, 0)   B -> A, C: (1/2, 1/3)   C -> B, A: (1/3, 0)   D -> A, B: (0, 0)
    # MAP@1 = (1/2 + 1/2 + 1/3 + 0) / 4 = 1/3;  MAP@2 = (1/4 + 5/12 + 1/6 + 0) / 4 = 5/24
    result = map_at_k(latents, labels, ks=(1, 2))
    assert result == pytest.approx({1: 1 / 3, 2: 5 / 24}, abs=1e-12)
    # Query kept (the reference script): A -> A,B,C: (1, 1/2, 0)  B -> B,A,C: (1, 1/2, 1/3)
    # C -> C,B,A: (1, 1/3, 0)  D -> A,B,C: (0, 0, 0)
    # MAP@1 = 3/4;  MAP@2 = (3/4 + 3/4 + 2/3 + 0) / 4 = 13/24;  MAP@3 = (1/2 + 11/18 + 4/9 + 0) / 4 = 7/18
    kept = map_at_k(latents, labels, ks=(1, 2, 3), exclude_query=False)
    assert kept == pytest.approx({1: 3 / 4, 2: 13 / 24, 3: 7 / 18}, abs=1e-12)
    with pytest.raises(RetrievalError, match="K = 3 needs at least 3 candidate"):
        map_at_k(latents, labels, ks=(3,))
    with pytest.raises(RetrievalError, match="0/1"):
        map_at_k(latents, labels * 0.5, ks=(1,))


def _loop_map(latents: np.ndarray, labels: np.ndarray, k: int) -> float:
    """The definition written out query by query, to check the vectorised code."""
    pool = [j for j in range(len(latents)) if labels[j].any()]
    values = []
    for i, query in enumerate(latents):
        candidates = [j for j in pool if j != i]
        scores = [float(query @ latents[j]) for j in candidates]
        best = sorted(range(len(candidates)), key=lambda n: scores[n], reverse=True)[:k]
        overlaps = []
        for n in best:
            other = labels[candidates[n]]
            overlaps.append(np.sum(labels[i] & other) / np.sum(labels[i] | other))
        values.append(np.mean(overlaps))
    return float(np.mean(values))


def _loop_recall(texts: np.ndarray, images: np.ndarray, k: int) -> float:
    hits = 0
    for i, text in enumerate(texts):
        scores = [float(text @ image) for image in images]
        hits += i in sorted(range(len(images)), key=lambda j: scores[j], reverse=True)[:k]
    return hits / len(texts)


def test_metrics_equal_loop_definition(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retrieval, "_ROW_BLOCK", 16)  # exercise several query blocks
    rng = np.random.default_rng(7)
    latents = random_units(70, seed=8).astype(np.float32).astype(np.float64)
    texts = unit(latents + 0.8 * rng.standard_normal(latents.shape)).astype(np.float32).astype(np.float64)
    labels = (rng.random((70, 18)) < 0.15).astype(int)
    labels[:5] = 0  # some queries without any positive label
    ks = (1, 5, 10, 50)
    assert map_at_k(latents, labels, ks) == pytest.approx({k: _loop_map(latents, labels, k) for k in ks}, abs=1e-9)
    assert recall_at_k(texts, latents, ks) == {k: _loop_recall(texts, latents, k) for k in ks}


def test_metrics_scale_to_3000_cases() -> None:
    latents = random_units(3000, dim=512, seed=9)
    labels = (np.random.default_rng(9).random((3000, 18)) < 0.2).astype(np.uint8)
    recall = recall_at_k(latents, latents)
    assert recall == {1: 1.0, 5: 1.0, 10: 1.0, 50: 1.0}  # every volume is its own best match
    scores = map_at_k(latents, labels)
    assert all(0.0 < v < 1.0 for v in scores.values())


# ---------------------------------------------------------------- reports, thumbnails, metrics of an index

PNG = b"\x89PNG\r\n\x1a\n" + b"pixels"  # only the signature is checked by the index


def test_reports_and_thumbnails_round_trip_and_search_by_report(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    index = CaseIndex(folder, MODEL, SHA_A, 3)
    index.add("a", [1.0, 0.0, 0.0], meta("a"), text_latent=[0.0, 2.0, 0.0], thumbnail_png=PNG + b"a")
    index.add("b", [0.0, 1.0, 0.0], meta("b"), text_latent=[1.0, 0.0, 0.0])
    index.add("c", [0.0, 0.0, 1.0], meta("c"), thumbnail_png=PNG + b"c")  # no report latent
    index.save()
    reopened = CaseIndex.open(folder)
    np.testing.assert_array_equal(reopened.text_latents, [[0, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert reopened.text_latent("c") is None and list(reopened.with_report_latent()) == [0, 1]
    assert reopened.thumbnail_path("a").read_bytes() == PNG + b"a" and reopened.thumbnail_path("b") is None
    # report targets: the query [1, 0, 0] matches b's report; c has none, so it is never a candidate
    assert [h.case_id for h in reopened.search([1.0, 0.0, 0.0], 3, target="reports")] == ["b", "a"]
    assert [h.case_id for h in reopened.search([1.0, 0.0, 0.0], 3)] == ["a", "b", "c"]
    with pytest.raises(RetrievalError, match="search target 'texts'"):
        reopened.search([1.0, 0.0, 0.0], 3, target="texts")

    # A replaced thumbnail: the old file goes with the next save, the kept one stays.
    reopened.add("a", [1.0, 0.0, 0.0], meta("a"), thumbnail_png=PNG + b"new")
    reopened.save()
    assert sorted(p.read_bytes() for p in (folder / "thumbnails").iterdir()) == [PNG + b"c", PNG + b"new"]
    with pytest.raises(RetrievalError, match="not a PNG"):
        reopened.add("d", [1.0, 0.0, 0.0], meta("d"), thumbnail_png=b"GIF89a")


def test_an_index_without_report_latents_still_opens(tmp_path: Path) -> None:
    """Indexes saved before reports were kept have no text_latents file: they open with no report latents."""
    folder = tmp_path / "index"
    new_index(folder).save()
    manifest = json.loads((folder / "index.json").read_text())
    (folder / manifest.pop("text_latents_file")).unlink()
    del manifest["text_latents_sha256"]
    (folder / "index.json").write_text(json.dumps(manifest))
    old = CaseIndex.open(folder)
    assert len(old) == 3 and not len(old.with_report_latent())
    with pytest.raises(RetrievalError, match="no indexed case has a report"):
        old.search(random_units(1)[0], 1, target="reports")


def test_index_metrics_hand_computed(tmp_path: Path) -> None:
    s = np.sqrt(0.5)
    images = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [s, s, 0], [1, 0, 0]]
    texts = [[1, 0, 0], [0.995, 0.0995, 0], [0, 0, 1], None, None]  # cases 3 and 4 have no report
    labels = [(1, 0, 0), (1, 1, 0), (0, 0, 0), (0, 1, 0), None]  # case 4 unlabelled; case 2 has no finding
    index = CaseIndex(tmp_path, MODEL, SHA_A, 3)
    for i, (image, text, flags) in enumerate(zip(images, texts, labels)):
        index.add(f"c{i}", image, meta(f"c{i}", labels=flags), text_latent=text)
    metrics = retrieval.index_metrics(index, ks=(1, 2, 5))
    # Reports 0-2 against images 0-2: report 1 scores image 0 (.995) above its own (.0995), the others rank first.
    assert metrics.report_to_image == pytest.approx({1: 2 / 3, 2: 1.0})
    # Images 0-2 against reports 0-2: every own report is first (image 1: .0995 against 0 and 0).
    assert metrics.image_to_report == pytest.approx({1: 1.0, 2: 1.0})
    # Queries c0-c3, candidates c0, c1, c3 (a positive label), the query left out; Jaccard overlap of the labels:
    # c0 -> c3 (.71), c1 (0): 0, 1/2    c1 -> c3 (.71), c0 (0): 1/2, 1/2    c2: no label, 0, 0
    # c3 -> c0 (.71), c1 (.71; tie, lower row first): 0, 1/2.   mAP@1 = 1/2 / 4, mAP@2 = (1/4 + 1/2 + 1/4) / 4
    assert metrics.image_to_image == pytest.approx({1: 0.125, 2: 0.25})
    assert (metrics.report_cases, metrics.labelled_cases, metrics.candidates) == (3, 4, 3)
    # chance: c0 (c1 1/2, c3 0) 1/4, c1 (1/2, 1/2) 1/2, c2 0, c3 (c0 0, c1 1/2) 1/4 -> 1/4
    assert metrics.image_to_image_chance == pytest.approx(0.25)
    assert metrics.skipped == ("K = 5 left out: only 3 report cases",
                               "K = 5 left out: only 2 labelled candidate cases (less the query)")
    printed = retrieval.format_index_metrics(metrics)
    assert "report->image Recall" in printed and "@1=0.667  @2=1.000" in printed and "@2=0.250" in printed


def test_describe_hit_names_findings_and_cuts_the_report(tmp_path: Path) -> None:
    index = CaseIndex(tmp_path, MODEL, SHA_A, 3)
    flags = tuple(int(name in ("Emphysema", "Lung nodule")) for name in retrieval.CT_RATE_ABNORMALITIES)
    source = tmp_path / "case.nii.gz"
    source.write_bytes(b"")
    index.add("x", [1.0, 0.0, 0.0], CaseMetadata(str(source), "fp", "word " * 100, flags), thumbnail_png=PNG)
    index.add("y", [0.0, 1.0, 0.0], CaseMetadata("/elsewhere/y.nii.gz", "fp"))
    index.save()
    x, y = (retrieval.describe_hit(index, hit, excerpt_chars=22) for hit in index.search([1.0, 0.0, 0.0], 2))
    assert x["findings"] == ["Emphysema", "Lung nodule"] and x["report"] == "word word word word …"
    assert x["reachable"] and Path(x["thumbnail"]).read_bytes() == PNG and x["score"] == 1.0
    assert y == {"case_id": "y", "score": 0.0, "source_path": "/elsewhere/y.nii.gz", "reachable": False,
                 "thumbnail": None, "findings": None, "report": None}


def test_case_reports_come_from_the_list_the_csv_or_a_file_beside(tmp_path: Path, ct_dir: Path) -> None:
    from CTFoundationLib.errors import CTInputError
    from CTFoundationLib.io.cases import discover_cases
    from CTFoundationLib.io.reports import case_annotations

    cases = tmp_path / "cases"
    cases.mkdir()
    for name in ("a", "b", "c"):
        (cases / f"{name}.nii.gz").write_bytes(b"")
    (cases / "s1").symlink_to(ct_dir / "ricord1a_419639-000082_chest_noncontrast" / "dicom")
    (cases / "b.txt").write_text("Beside b (ignored: the CSV names one).")
    (cases / "c.txt").write_text("  'Beside' c.  ")
    (cases / "s1.txt").write_text("Beside the series.")
    (cases / "notes.txt").write_text("a stray file")
    reports = tmp_path / "reports.csv"
    reports.write_text("VolumeName,Findings_EN\na.nii.gz,\"CSV (a).\"\nb.nii.gz,CSV b.\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("VolumeName," + ",".join(retrieval.CT_RATE_ABNORMALITIES) + "\na.nii.gz," + ",".join(
        ["1"] + ["0"] * 17) + "\n")
    found = discover_cases([cases])
    assert [c.case_id for c in found.cases] == ["a", "b", "c", "s1"]
    assert [s.path.name for s in found.skipped] == ["notes.txt"]  # the reports beside the CTs are not strays
    annotations = case_annotations(found.cases, reports, labels)
    assert {case_id: a.report for case_id, a in annotations.items()} == {
        "a": "CSV a.", "b": "CSV b.", "c": "Beside c.", "s1": "Beside the series."}
    assert annotations["a"].labels == (1,) + (0,) * 17 and annotations["b"].labels is None

    listing = tmp_path / "list.csv"
    listing.write_text("path,report\ncases/a.nii.gz,From the list.\n")
    assert case_annotations(discover_cases([listing]).cases, reports)["a"].report == "From the list."
    labels.write_text("VolumeName," + ",".join(retrieval.CT_RATE_ABNORMALITIES) + "\na.nii.gz," + ",".join(
        ["0.7"] + ["0"] * 17) + "\n")
    with pytest.raises(CTInputError, match=r"labels.csv, line 2: labels must be 0 or 1"):
        case_annotations(found.cases, labels_csv=labels)
