"""The GPU cost model (scn_fast/gpu_cost.py): its weight-GEMM FLOPs against the nn.Linear calls a
reference model actually makes, its structure (what runs on tensor cores, how launches grow), and
docs/gpu.md printing its current tables."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scn_fast import AtomsBatch, SphericalChannelNetwork, gpu_cost, preset
from scn_fast.benchmark.floor import record_gemm_calls
from scn_fast.benchmark.systems import build_system, parse_size

DOC = Path(__file__).resolve().parents[1] / "docs" / "gpu.md"


def test_linear_flops_match_a_reference_forward():
    """With the edge counts of a real graph, the model's weight-GEMM ("linear") FLOPs of the
    reference path equal the FLOPs of every nn.Linear call of a reference forward."""
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = SphericalChannelNetwork(**cfg, deterministic_frames=True)
    data = AtomsBatch.from_ase(build_system(parse_size("14")))
    with record_gemm_calls(model) as calls, torch.no_grad():
        model(data)
    recorded = sum(c.flops for c in calls)
    atoms = 14
    edges = [
        next(c.m for c in calls if c.name.endswith(f"message_blocks.{r}.fc1_dist"))
        for r in range(2)
    ]
    hidden = cfg["hidden_channels"]
    shapes = gpu_cost.Shapes(
        atoms,
        blocks=cfg["num_interactions"],
        channels=cfg["sphere_channels"],
        basis=cfg["num_basis_functions"],
        gaussians=int(cfg["cutoff"] / 0.02),
        mmax=1,
        taps=4,
        resolutions=((4, hidden, edges[0] / atoms), (4, hidden // 4, edges[1] / atoms)),
        lmax=cfg["lmax"],
        bands=cfg["num_bands"],
        points=cfg["num_sphere_samples"],
    )
    ops = gpu_cost.block_ops("reference", shapes, training=False) * shapes.blocks
    ops += gpu_cost.heads_ops(shapes)
    modelled = sum(op.flops for op in ops if op.kind == "linear")
    assert modelled == pytest.approx(recorded, rel=1e-9)


@pytest.mark.parametrize("atoms", [100, 1000, 2000])
def test_structure_of_the_predictions(atoms):
    ref = {p: gpu_cost.step_cost("reference", p, atoms) for p in ("fp32", "tf32", "bf16")}
    for precision in ("fp32", "tf32", "bf16"):
        for path in ("triton", "extension"):
            c = gpu_cost.step_cost(path, precision, atoms)
            # the tap symmetry, the compact rotation and the coefficient-space fc1: fewer FLOPs
            assert c.flops < 0.7 * ref[precision].flops and c.bytes < ref[precision].bytes / 2
            assert c.saved_bytes < ref[precision].saved_bytes / 4
            # fp32 is exact IEEE (no tensor cores); tf32 / bf16 put every GEMM on tensor cores
            assert (c.tc_flops == 0) if precision == "fp32" else (c.tc_flops == c.flops)
            assert c.step_s < ref[precision].step_s
        assert ref[precision].tc_flops < ref[precision].flops  # rotations stay float32
    # one step is ~3x a forward
    fwd = gpu_cost.step_cost("reference", "fp32", atoms, training=False)
    assert ref["fp32"].flops == pytest.approx(3 * fwd.flops)


def test_launches_grow_sublinearly_with_atoms():
    """Fused launches grow only with the number of grid tiles (sized from the memory budget)."""
    l100, l1000, l2000 = (
        gpu_cost.step_cost("triton", "bf16", n).launches for n in (100, 1000, 2000)
    )
    assert l100 <= l1000 <= l2000 < 1.5 * l100
    assert gpu_cost.step_cost("reference", "bf16", 2000).launches == pytest.approx(
        gpu_cost.step_cost("reference", "bf16", 100).launches
    )


def test_bad_arguments():
    with pytest.raises(ValueError, match="path"):
        gpu_cost.step_cost("cuda", "fp32", 10)
    with pytest.raises(ValueError, match="precision"):
        gpu_cost.step_cost("triton", "fp16", 10)


def test_docs_print_the_current_tables():
    """docs/gpu.md holds the tables the model prints today (regenerate with
    ``python -m scn_fast.gpu_cost`` after changing it)."""
    text = DOC.read_text()
    assert gpu_cost.markdown_table(training=True, device="H100") in text
    assert gpu_cost.markdown_table(training=False, device="H100") in text
    assert gpu_cost.markdown_table(training=True, device="H200") in text
    assert gpu_cost.breakdown_table(device="H100") in text
    assert gpu_cost.launch_table("H100") in text
