"""``scn_fast.kernels`` from a plain checkout (nothing installed, the repository root on ``sys.path``).

The Triton kernels live in the top-level ``kernels/`` folder of the repository and are packaged as
``scn_fast.kernels`` (pyproject's ``package-dir`` mapping). An installed wheel holds them at
``scn_fast/kernels/``, and an editable install maps the name with its own import finder; a checkout used
through ``PYTHONPATH`` has neither, so ``import scn_fast.kernels`` would fail. ``mount_checkout_kernels``
then puts a finder first on ``sys.meta_path`` that answers for exactly that one name with the kernels/
folder of the checkout this scn_fast was imported from (its submodules are found through the package's
``__path__`` as usual). First, so that an editable install of another checkout cannot hand out its
kernels instead; it is mounted only when scn_fast comes from a checkout, never from an installed
wheel. Importing this module (scn_fast's ``__init__`` does, first) mounts it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

PACKAGE = "scn_fast.kernels"


class CheckoutKernelsFinder(importlib.abc.MetaPathFinder):
    """Finds ``scn_fast.kernels`` (only that name) in ``kernels_dir``."""

    def __init__(self, kernels_dir: Path) -> None:
        self.kernels_dir = kernels_dir

    def find_spec(self, fullname, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname != PACKAGE:
            return None
        return importlib.util.spec_from_file_location(
            PACKAGE,
            self.kernels_dir / "__init__.py",
            submodule_search_locations=[str(self.kernels_dir)],
        )

    def __repr__(self) -> str:
        return f"CheckoutKernelsFinder({str(self.kernels_dir)!r})"


def checkout_kernels_dir(package_dir: Path) -> Path | None:
    """The checkout's ``kernels/`` next to ``package_dir`` (the scn_fast folder) when scn_fast is used
    from a checkout without its own ``kernels`` subpackage; else None."""
    if (package_dir / "kernels" / "__init__.py").is_file():
        return None  # an installed wheel: scn_fast/kernels is a real subpackage
    root = package_dir.parent
    kernels = root / "kernels"
    if (kernels / "__init__.py").is_file() and (root / "pyproject.toml").is_file():
        return kernels
    return None


def mount_checkout_kernels(package_dir: Path) -> CheckoutKernelsFinder | None:
    """Put the finder for the checkout's ``kernels/`` first on ``sys.meta_path`` (once); returns it,
    or None if not needed."""
    kernels = checkout_kernels_dir(package_dir)
    if kernels is None:
        return None
    for finder in sys.meta_path:
        if isinstance(finder, CheckoutKernelsFinder):
            return finder
    finder = CheckoutKernelsFinder(kernels)
    sys.meta_path.insert(0, finder)
    return finder


mount_checkout_kernels(Path(__file__).resolve().parent)
