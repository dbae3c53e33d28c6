import atexit
import os
import shutil
import sys
import tempfile

# Tests run on the CPU with one device unless a test starts its own process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))
# Lower XLA:CPU code-generation effort for this process: the same HLO programs (every
# XLA pass that decides the arithmetic still runs), compiled by LLVM with less
# optimisation, so tiny programs compile about a third faster; results may differ from
# the default build in the last bits, which no test depends on (each compares two
# computations of this process, or a reference with a tolerance). Child processes
# (notebook kernels, CLI and multi-device workers) set their own flags.
# TJ_TEST_FULL_OPT=1 keeps XLA's defaults.
from xla_flags import FAST_COMPILE  # noqa: E402  (tests/ is on sys.path just above)


def _fast_compile_for_this_process() -> None:
    if os.environ.get("TJ_TEST_FULL_OPT"):
        return
    before = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = f"{before or ''} {FAST_COMPILE}".strip()
    import jax
    jax.devices()   # the backend reads XLA_FLAGS now, once
    if before is None:   # children get the caller's environment back
        del os.environ["XLA_FLAGS"]
    else:
        os.environ["XLA_FLAGS"] = before


_fast_compile_for_this_process()


def _share_compilations_within_the_session() -> None:
    """Most of the suite's time is XLA compiling tiny programs, and many tests compile
    the very same program again (each `train()` call builds fresh jitted closures, so
    jit's in-memory cache misses). JAX's persistent compilation cache keys on the
    lowered program and compile options, so an identical program is compiled once and
    then loaded: the same executable, the same numbers. The cache lives in a fresh
    directory for this process only (removed at exit), so no run reuses another's
    work and each suite run pays its own compilations. TJ_TEST_NO_XLA_CACHE=1 turns
    it off."""
    if os.environ.get("TJ_TEST_NO_XLA_CACHE"):
        return
    import jax
    cache = tempfile.mkdtemp(prefix="tj-xla-cache-")
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", cache)
    # Tiny programs compile in well under the default 1 s threshold; cache them too.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.05)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


_share_compilations_within_the_session()
