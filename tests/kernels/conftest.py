"""Run the Triton kernels on CPU through Triton's interpreter.

TRITON_INTERPRET is read when a kernel is decorated, i.e. when
``atlas_kernels.triton_impl`` is first imported, so it is set here before any
import. It lasts for the whole pytest process; nothing outside ``atlas_kernels``
uses Triton (torch reads it only in ``torch.compile``'s inductor), so the other
test folders are unaffected.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import sys  # noqa: E402
from types import ModuleType  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def kernels() -> ModuleType:
    """``atlas_kernels.triton_impl`` with every kernel interpreted on CPU."""
    pytest.importorskip("triton")
    already = sys.modules.get("atlas_kernels.triton_impl")
    module = importlib.import_module("atlas_kernels.triton_impl")
    if already is not None and not module._interpreting():
        # Imported before this conftest set the flag: decorate the kernels again.
        module = importlib.reload(module)
    assert module._interpreting()
    return module
