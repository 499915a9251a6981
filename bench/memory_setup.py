"""The shared set-up of the memory scripts (``memory_probe.py``, ``memory_breakdown.py``): their
common command-line options and the model and Cu(111)+CO slab one inference call runs on."""

from __future__ import annotations

import argparse

import torch
from ase import Atoms

from scn_fast import AtomsBatch, SphericalChannelNetwork
from scn_fast.presets import preset
from scn_fast.systems import slab_of_size


def slab_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by ``doc``'s first line, with --natoms (required), --preset (default
    scn-t4-b2), --fused, --threads, --memory-budget ("auto", "none" or bytes) and
    --checkpoint ("auto", "edges", "off"); a script adds its own options to it."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--natoms", type=int, required=True)
    p.add_argument("--preset", default="scn-t4-b2")
    p.add_argument("--fused", action="store_true")
    p.add_argument("--threads", type=int)
    p.add_argument(
        "--memory-budget",
        default="auto",
        help='bytes of message intermediates per edge chunk, "auto" or "none" (unchunked)',
    )
    p.add_argument("--checkpoint", default="auto", choices=("auto", "edges", "off"))
    return p


def memory_budget(text: str) -> int | str | None:
    """--memory-budget's value: "auto", None ("none") or a number of bytes (e.g. 256e6)."""
    if text in ("auto", "none"):
        return None if text == "none" else text
    return int(float(text))


def model_and_slab(
    args: argparse.Namespace,
) -> tuple[SphericalChannelNetwork, Atoms, AtomsBatch]:
    """(model, slab, batch): applies --threads, seeds torch with 0, builds the preset's model in
    eval mode (fused if --fused, deterministic frames) and a slab of about --natoms atoms."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = SphericalChannelNetwork(
        **preset(args.preset),
        use_fused=args.fused,
        deterministic_frames=True,
        memory_budget=memory_budget(args.memory_budget),
        activation_checkpointing=args.checkpoint,
    ).eval()
    atoms = slab_of_size(args.natoms)
    return model, atoms, AtomsBatch.from_ase([atoms])
