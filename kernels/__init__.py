"""Triton kernels of scn_fast, installed as ``scn_fast.kernels`` (never as a top-level ``kernels``).

One module per fused op (kernels, launchers). The fused ops arrive with the fused edge path and
grid projection; until then the package holds no kernels and the dispatcher says so.
"""
