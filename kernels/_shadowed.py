"""Load the installed top-level ``kernels`` package that this directory shadows (see ``__init__``).

Kept free of imports from the rest of ``hpsearch.kernels``: it runs when this directory is
imported under the wrong name, before anything else of it may load.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType

__all__ = ["load_shadowed"]


def load_shadowed(init_file: str) -> ModuleType | None:
    """The ``kernels`` package found on ``sys.path`` past the checkout that holds ``init_file``
    (Hugging Face's, where installed), executed and returned; None if there is none (the caller
    then stays an empty module without a ``__version__``, which transformers reads as "not
    installed")."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    for entry in sys.path:
        if os.path.abspath(entry or os.getcwd()) == checkout:
            continue
        spec = importlib.machinery.PathFinder.find_spec("kernels", [entry])
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["kernels"]
            raise
        return module
    return None
