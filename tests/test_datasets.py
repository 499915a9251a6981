"""Dataset formats: every format round-trips EMT-labelled structures; OC20 LMDB in each record layout,
lazily, safely; clear errors; batches by atom budget."""

from __future__ import annotations

import builtins
import os
import pickle

import numpy as np
import pytest
import torch

from scn_fast.batching import iter_batches
from scn_fast.datasets import SampleOrder, TrainingSet, emt_dataset, open_dataset, write_dataset
from scn_fast.oc20_lmdb import close_envs, safe_loads, sample_from_fields, write_oc20_lmdb
from scn_fast.readers import fixed_mask

lmdb = pytest.importorskip("lmdb", reason="the lmdb package (scn_fast[lmdb]) is not installed")

try:
    import torch_geometric  # noqa: F401

    HAVE_PYG = True
except ImportError:
    HAVE_PYG = False
try:
    import ase_db_backends.aselmdb  # noqa: F401

    HAVE_ASELMDB = True
except ImportError:
    HAVE_ASELMDB = False


@pytest.fixture(scope="module")
def emt():
    return emt_dataset(n_structures=3, seed=2)


FORMATS = [
    ("extxyz", None),
    ("traj", None),
    ("db", None),
    ("json", None),
    pytest.param(
        "aselmdb",
        None,
        marks=pytest.mark.skipif(not HAVE_ASELMDB, reason="ase-db-backends not installed"),
    ),
    pytest.param(
        "lmdb", "pyg", marks=pytest.mark.skipif(not HAVE_PYG, reason="torch_geometric missing")
    ),
    ("lmdb", "legacy"),
    ("lmdb", "dict"),
]


@pytest.mark.parametrize(("ext", "layout"), FORMATS)
def test_every_format_round_trips(tmp_path, emt, ext, layout):
    path = str(tmp_path / f"emt.{ext}")
    write_dataset(path, emt, lmdb_layout=layout or "pyg")
    ds = open_dataset(path)
    assert len(ds) == len(emt)
    tol = 1e-5 if ext == "extxyz" else 1e-12  # extxyz is text (8 decimals); the rest binary
    for k, atoms in enumerate(emt):
        s = ds[k]
        assert np.array_equal(s.numbers, atoms.numbers)
        np.testing.assert_allclose(s.positions, atoms.positions, rtol=0, atol=tol)
        np.testing.assert_allclose(s.cell, atoms.cell[:], rtol=0, atol=tol)
        assert np.array_equal(s.pbc, atoms.pbc)
        assert s.energy == pytest.approx(atoms.calc.results["energy"], abs=tol)
        np.testing.assert_allclose(s.forces, atoms.calc.results["forces"], rtol=0, atol=tol)
        assert np.array_equal(s.fixed, fixed_mask(atoms)) and s.fixed.any()
        assert np.array_equal(s.tags, atoms.get_tags())
        assert ds.natoms(k) == len(atoms)
        back = ds.atoms(k)  # FixAtoms and the labels survive the trip back to ase.Atoms
        assert np.array_equal(fixed_mask(back), fixed_mask(atoms))
        assert back.calc.results["energy"] == pytest.approx(s.energy)
    if ext == "lmdb":
        assert ds[1].sid == 1 and ds[1].fid == 0
    close_envs()


def test_lmdb_folder_and_metadata(tmp_path, emt):
    folder = tmp_path / "s2ef"
    folder.mkdir()
    write_oc20_lmdb(str(folder / "a.lmdb"), emt[:2], layout="legacy")
    write_oc20_lmdb(str(folder / "b.lmdb"), emt[2:], layout="dict")
    np.savez(folder / "metadata.npz", natoms=np.array([len(a) for a in emt]))
    ds = open_dataset(str(folder))
    assert len(ds) == 3
    assert ds[2].energy == pytest.approx(emt[2].calc.results["energy"])
    assert [ds.natoms(i) for i in range(3)] == [len(a) for a in emt]
    close_envs()


def test_lmdb_is_lazy(tmp_path, emt, monkeypatch):
    """A million entries: len() comes from the entry count, and only the records asked for are
    read and decoded (every other value is junk that would fail to unpickle)."""
    path = str(tmp_path / "big.lmdb")
    n = 1_000_000
    env = lmdb.open(path, subdir=False, map_size=1 << 30)
    with env.begin(write=True) as txn:
        for j in range(n):
            txn.put(str(j).encode("ascii"), b"junk")
        from scn_fast.oc20_lmdb import encode_record
        from scn_fast.readers import Sample

        for j, atoms in zip((7, 654_321), emt, strict=False):
            txn.put(str(j).encode("ascii"), encode_record(Sample.from_atoms(atoms), "legacy"))
    env.close()
    decoded = []
    import scn_fast.oc20_lmdb as mod

    real = mod.safe_loads
    monkeypatch.setattr(mod, "safe_loads", lambda raw: decoded.append(raw) or real(raw))
    ds = open_dataset(path)
    assert len(ds) == n and decoded == []
    assert ds[654_321].energy == pytest.approx(emt[1].calc.results["energy"])
    assert ds[7].energy == pytest.approx(emt[0].calc.results["energy"])
    assert len(decoded) == 2
    with pytest.raises(ValueError, match="record 8 of"):
        ds[8]  # junk: decoded only when asked for, then a clear error
    close_envs()


def test_restricted_unpickler_refuses_code():
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
        safe_loads(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.eval"):
        safe_loads(pickle.dumps(builtins.eval))
    assert torch.equal(safe_loads(pickle.dumps({"x": torch.arange(3)}))["x"], torch.arange(3))


def test_missing_fields_are_listed():
    with pytest.raises(ValueError, match=r"missing the field\(s\) \['pos', 'cell'\]"):
        sample_from_fields({"atomic_numbers": torch.ones(2)}, "record 0 of x.lmdb")
    fields = {"pos": torch.zeros(2, 3), "atomic_numbers": torch.ones(2), "cell": torch.eye(3)}
    sample = sample_from_fields(fields, "record 0")
    with pytest.raises(ValueError, match="has no energy and no forces"):
        sample.check_labels(0, "x.lmdb")
    with pytest.raises(ValueError, match="natoms is 3 but pos has 2"):
        sample_from_fields({**fields, "natoms": 3}, "record 0")


def test_missing_extra_names_it(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_lmdb(name, *args, **kwargs):
        if name in ("lmdb", "ase_db_backends.aselmdb"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    (tmp_path / "x.lmdb").write_bytes(b"")
    (tmp_path / "x.aselmdb").write_bytes(b"")
    monkeypatch.setattr(builtins, "__import__", no_lmdb)
    with pytest.raises(ImportError, match=r"pip install 'scn_fast\[lmdb\]'"):
        open_dataset(str(tmp_path / "x.lmdb"))
    with pytest.raises(ImportError, match=r"pip install 'scn_fast\[lmdb\]'"):
        open_dataset(str(tmp_path / "x.aselmdb"))


def test_training_set_reads_only_what_a_batch_needs(tmp_path, emt):
    path = str(tmp_path / "emt.db")
    write_dataset(path, emt)
    ds = open_dataset(path)
    calls = []
    real = ds._get
    ds._get = lambda i: calls.append(i) or real(i)
    ts = TrainingSet(ds)
    assert calls == [0]  # the first structure's labels are checked at once
    batch = ts.batch([2, 1])
    assert calls == [0, 2, 1]
    assert (
        batch.free.tolist() == (~np.concatenate([fixed_mask(emt[2]), fixed_mask(emt[1])])).tolist()
    )


def test_batches_by_atom_budget():
    sizes = [5, 3, 4, 6, 2]
    batches = list(iter_batches(range(5), sizes.__getitem__, batch_size=None, max_atoms=8))
    assert batches == [[0, 1], [2], [3, 4]]
    assert list(iter_batches(range(5), sizes.__getitem__, batch_size=2)) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="structure 3 has 6 atoms"):
        list(iter_batches(range(5), sizes.__getitem__, max_atoms=5))

    order = SampleOrder(5, seed=0)
    seen = []
    for _ in range(3):
        packs = order.next_packs(sizes.__getitem__, max_atoms=9, num_packs=2)
        assert len(packs) == 2 and all(packs)
        assert all(sum(sizes[i] for i in p) <= 9 for p in packs)
        flat = [i for p in packs for i in p]
        assert len(set(flat)) == len(flat)
        seen.append(flat)
    again = SampleOrder(5, seed=0)
    assert [
        [i for p in again.next_packs(sizes.__getitem__, 9, 2) for i in p] for _ in range(3)
    ] == seen
