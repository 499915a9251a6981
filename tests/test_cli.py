"""The ``scn-fast`` command line (the README's main job) on built-in and file inputs."""

from __future__ import annotations

import ase.io
import pytest

from scn_fast.cli import main
from scn_fast.systems import cu111_co, pt_bulk


def test_predict_builtin_slab(capsys):
    assert main(["predict", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "built-in Cu(111)+CO slab: 1 structure(s), 38 atoms" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  ") and "e" in line]
    atom_rows = [r for r in rows if len(r) == 5 and r[0].isdigit()]
    assert "energy =" in out and len(atom_rows) == 38
    assert all(abs(float(v)) < 1.0 for r in atom_rows for v in r[2:])
    assert "edge_rotation=reference" in out


def test_predict_reads_every_frame_of_a_file(tmp_path, capsys):
    path = tmp_path / "two.extxyz"
    ase.io.write(path, [cu111_co(size=(2, 2, 3)), pt_bulk()])
    assert main(["predict", str(path), "--preset", "tiny", "--deterministic-frames"]) == 0
    out = capsys.readouterr().out
    assert "2 structure(s), 18 atoms" in out and "structure 1: Pt4" in out


def test_predict_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        main(["predict", str(tmp_path / "nope.xyz"), "--preset", "tiny"])
