"""XLA flags the tests share.

FAST_COMPILE lowers XLA:CPU's code-generation effort: the same HLO programs (every
XLA pass that decides the arithmetic still runs), compiled by LLVM with less
optimisation, so tiny programs compile much faster and run somewhat slower. The
suite's processes and the children it starts (doc blocks, notebook kernels, CLI and
multi-device workers) use it; TJ_TEST_FULL_OPT=1 makes it empty (XLA's defaults).
"""
import os

FAST_COMPILE = "" if os.environ.get("TJ_TEST_FULL_OPT") else \
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def child_xla_flags(*extra: str) -> str:
    """XLA_FLAGS for a child process: this environment's, FAST_COMPILE, then `extra`."""
    return " ".join(filter(None, (os.environ.get("XLA_FLAGS"), FAST_COMPILE, *extra)))
