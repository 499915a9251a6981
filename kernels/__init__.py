"""Triton kernels of scn_fast, installed as ``scn_fast.kernels`` (never as a top-level ``kernels``).

One file per job:

* ``edge_rotation.py``: gather + rotate into the edge frame, rotate back + scatter (compact Wigner
  rows; ``scn_fast::edge_rotation`` / ``scn_fast::scatter_aggregation``);
* ``tap_elementwise.py``: the message MLP's gate and tap combination;
* ``gemm.py``: the GEMM with fused prologue / epilogue and an explicit precision (fp32 / tf32 /
  bf16), used by ``grid_mlp.py`` (the spherical grid MLP's tile loops) and ``sphere_heads.py`` (the
  output heads' tile loops), which share ``tile_loop.py``; ``grid_projection.py`` gathers their
  public names; ``tiling.py`` sizes their tiles from a memory budget (pure Python);
* ``aot.py``: launching (every launcher launches through it), tracing launches on meta tensors,
  and compiling the traced specialisations for sm_80 / sm_90 without a GPU.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernels run on CPU tensors in
Triton's interpreter; otherwise on CUDA tensors. docs/gpu.md describes how the GPU code is checked.
"""
