"""Embedded QM9 sample: the build script end to end on 12 SMILES, the loader, its errors, the pool."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import io
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from elign.data import QM9SampleDataset, collate_qm9, load_qm9_sample, sample_node_histogram, sample_smiles
from elign.data.sample import DEFAULT_SAMPLE_DIR, NPZ_NAME, SMILES_NAME, SOURCE_NAME
from elign.engine.errors import ConfigError, DataFormatError

pytest.importorskip("rdkit")
pytest.importorskip("tblite")
from elign.chem.stability import check_stability  # noqa: E402
from elign.data import sample_build  # noqa: E402

REPO = Path(__file__).resolve().parents[3]

# Small molecules (fast xTB) covering every filter: 10 keep, benzene is unstable (aromatic C-C on the
# C=C threshold), and the epoxide has an unspecified stereocentre that the 3D geometry assigns, so its
# SMILES cannot round-trip.
SMILES = ["C", "CC", "CO", "C#N", "CC=O", "OCC#N", "CC(N)=O", "c1ccoc1", "O=C1CC1", "N#CC(=O)O",
          "c1ccccc1", "CC1(C)OC1C#C"]
DROPPED = {11: "unstable", 12: "smiles_mismatch"}  # 1-based line -> status


def _script():
    spec = importlib.util.spec_from_file_location("build_qm9_sample", REPO / "scripts" / "build_qm9_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    """Build the 12-molecule sample, interrupted after 5 molecules and resumed (~10 s)."""
    tmp = tmp_path_factory.mktemp("sample")
    smiles_file = tmp / "smiles_in.txt"
    smiles_file.write_text("\n".join(SMILES) + "\n")
    out = tmp / "qm9_sample"
    argv = ["--smiles", str(smiles_file), "--num-molecules", "12", "--seed", "0", "--workers", "1",
            "--out", str(out)]
    script = _script()
    real = sample_build.run_jobs

    def interrupted(jobs, on_result, **kw):
        real(list(jobs)[:5], on_result, **kw)
        raise KeyboardInterrupt

    sample_build.run_jobs = interrupted
    try:
        assert script.main(argv) == 130  # Ctrl-C: checkpoint kept, friendly exit code
    finally:
        sample_build.run_jobs = real
    assert len((out / ".partial_build.jsonl").read_text().splitlines()) == 1 + 5  # header + records
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert script.main(argv) == 0
    return out, stdout.getvalue()


def test_build_files_and_contents(built):
    out, stdout = built
    assert "resuming: 5 molecules already done" in stdout
    assert "kept 10/12" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", NPZ_NAME, SMILES_NAME, SOURCE_NAME])

    rows = [ln.split("\t") for ln in (out / SOURCE_NAME).read_text().splitlines()]
    assert [int(r[0]) for r in rows] == list(range(1, 13))
    assert [r[1] for r in rows] == SMILES
    assert {int(r[0]): r[2] for r in rows if r[2] != "kept"} == DROPPED

    data = load_qm9_sample(out)
    m = 10
    assert data["num_atoms"].shape == (m,) and data["source_line"].tolist() == [i for i in range(1, 11)]
    assert data["positions"].dtype == np.float32 and data["atomic_numbers"].dtype == np.int8
    assert data["positions"].shape == (int(data["num_atoms"].sum()), 3)
    kept_smiles = (out / SMILES_NAME).read_text().splitlines()
    assert kept_smiles == data["smiles"] == ["C", "CC", "CO", "C#N", "CC=O", "N#CCO", "CC(N)=O", "c1ccoc1",
                                             "O=C1CC1", "N#CC(=O)O"]  # OCC#N comes back canonical
    assert (data["energy_ev"] < 0).all()
    for i in range(m):
        rows_i = slice(data["offsets"][i], data["offsets"][i + 1])
        assert check_stability(data["positions"][rows_i], data["atomic_numbers"][rows_i]).molecule_stable
    sizes = {k: len(v) for k, v in data["splits"].items()}
    assert sizes == {"train": 8, "valid": 1, "test": 1}

    readme = (out / "README.md").read_text()
    for text in ("--num-molecules 12 --seed 0 --workers 1", "Drawn 12, kept 10, dropped 2 (16.7 %",
                 "| `unstable` | 1 |", "| `smiles_mismatch` | 1 |", "rdkit ", "tblite "):
        assert text in readme


def test_dataset_collates_centred_batches(built):
    out, _ = built
    ds = QM9SampleDataset("train", path=out)
    assert len(ds) == 8 and len(ds.smiles) == 8 and ds.energies_ev.shape == (8,)
    assert len(QM9SampleDataset("all", path=out)) == 10
    batch = collate_qm9([ds[i] for i in range(len(ds))])
    counts = torch.tensor([int(ds[i]["node_mask"].sum()) for i in range(len(ds))])
    n = int(counts.max())
    assert batch["positions"].shape == (8, n, 3) and batch["one_hot"].shape == (8, n, 5)
    assert batch["charges"].shape == (8, n, 1) and batch["node_mask"].shape == (8, n)
    assert torch.equal(batch["node_mask"].sum(1), counts)
    mask = batch["node_mask"]
    assert torch.all(batch["positions"][~mask] == 0) and torch.all(batch["one_hot"][~mask] == 0)
    assert torch.equal(batch["one_hot"][mask].sum(-1), torch.ones(int(mask.sum())))
    centre = batch["positions"].sum(1) / counts[:, None]
    assert centre.abs().max() < 1e-5
    raw = QM9SampleDataset("train", path=out, center=False)[0]["positions"]
    assert raw.mean(0).abs().max() > 1e-4 or raw.shape[0] == 1  # centring really did something
    data = load_qm9_sample(out)
    assert batch["index"].tolist() == data["source_line"][data["splits"]["train"]].tolist()

    hist = sample_node_histogram("train", path=out)
    assert sum(hist.values()) == 8 and list(hist) == sorted(hist)
    assert hist == dict(sorted(Counter(counts.tolist()).items()))
    assert sample_smiles("train", path=out) == ds.smiles
    with pytest.raises(ConfigError, match="split"):
        QM9SampleDataset("training", path=out)


def _copy(built, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(built[0], dst)
    return dst


def test_missing_files_name_the_file_and_the_build_command(built, tmp_path):
    folder = _copy(built, tmp_path)
    (folder / SMILES_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{SMILES_NAME}.*build_qm9_sample\.py"):
        load_qm9_sample(folder)
    (folder / NPZ_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{NPZ_NAME}.*build_qm9_sample\.py --workers 2 --out"):
        QM9SampleDataset("train", path=folder)


def test_corrupt_files_name_the_file(built, tmp_path):
    folder = _copy(built, tmp_path)
    npz, smi = folder / NPZ_NAME, folder / SMILES_NAME
    good = npz.read_bytes()
    npz.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataFormatError, match=rf"{NPZ_NAME}.*corrupt"):
        load_qm9_sample(folder)
    with np.load(io.BytesIO(good)) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(npz, **{k: v for k, v in arrays.items() if k != "offsets"})
    with pytest.raises(DataFormatError, match=rf"{NPZ_NAME}.*offsets"):
        load_qm9_sample(folder)
    np.savez(npz, **{**arrays, "valid_idx": arrays["train_idx"]})
    with pytest.raises(DataFormatError, match="partition"):
        load_qm9_sample(folder)
    npz.write_bytes(good)
    smi.write_text("\n".join(smi.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(DataFormatError, match=rf"{SMILES_NAME}.*9 lines for the 10 molecules"):
        sample_smiles("train", path=folder)


def test_draw_and_split_are_seeded():
    script = _script()
    lines = script.draw_lines(100, 10, seed=3)
    assert np.array_equal(lines, np.sort(np.random.default_rng(3).choice(100, 10, replace=False)) + 1)
    assert np.array_equal(lines, script.draw_lines(100, 10, seed=3)) and len(set(lines.tolist())) == 10
    assert lines.min() >= 1 and lines.max() <= 100
    split = script.split_indices(3000, seed=0)
    assert {k: len(v) for k, v in split.items()} == {"train": 2400, "valid": 300, "test": 300}
    assert np.array_equal(np.sort(np.concatenate(list(split.values()))), np.arange(3000))
    default = Path(os.environ.get("ELIGN_QM9_SMILES", REPO.parent / "shared" / "data" / "qm9_smiles.txt"))
    assert script.DEFAULT_SMILES == default


def _probe_or_crash(job):
    """Pool worker for the test below: dies on "crash", else reports the OpenMP threads xTB would use."""
    if job[1] == "crash":
        os._exit(3)
    import tblite.ase  # noqa: F401 - loads the OpenMP runtime tblite binds to

    try:
        threads = ctypes.CDLL("libgomp.so.1").omp_get_max_threads()
    except OSError:
        threads = 1  # no GNU OpenMP on this platform: nothing to check
    return {"line": job[0], "smiles": job[1], "status": "kept", "threads": threads}


def test_worker_crash_is_isolated_and_workers_run_single_threaded():
    jobs = [(1, "a", 0, 0.05), (2, "crash", 0, 0.05), (3, "b", 0, 0.05)]
    got: list[dict] = []
    sample_build.run_jobs(jobs, got.append, workers=2, worker_fn=_probe_or_crash)
    by_line = {r["line"]: r for r in got}
    assert sorted(by_line) == [1, 2, 3] and len(got) == 3
    assert by_line[2]["status"] == "worker_crashed"
    assert by_line[1]["status"] == by_line[3]["status"] == "kept"
    assert by_line[1]["threads"] == by_line[3]["threads"] == 1


def test_process_smiles_reports_embedding_failure_without_raising():
    # A strained cage with fixed stereo that ETKDG cannot embed within 3 seeds (~2 s).
    rec = sample_build.process_smiles((7, "CC(C)C[C@H]1O[C@H]2C[C@H]21", 0, 0.05))
    assert rec["status"] == "embed_failed" and "ETKDG" in rec["detail"] and rec["line"] == 7
    rec = sample_build.process_smiles((8, "not a smiles", 0, 0.05))
    assert rec["status"] == "error" and "cannot parse" in rec["detail"]


def test_shipped_sample_if_built():
    """The copy in the package (skipped until ``scripts/build_qm9_sample.py`` has been run)."""
    if not (DEFAULT_SAMPLE_DIR / NPZ_NAME).is_file():
        pytest.skip(f"{DEFAULT_SAMPLE_DIR / NPZ_NAME} not built yet")
    data = load_qm9_sample()
    m = data["num_atoms"].shape[0]
    assert m >= 1000 and len(data["smiles"]) == m
    assert sum(sample_node_histogram("train").values()) == len(QM9SampleDataset("train"))
    assert len(set(data["smiles"])) == m  # the source file is de-duplicated and every SMILES round-trips
    assert set(sample_smiles("test")).isdisjoint(sample_smiles("train"))
