"""XLA flags the tests share.

FAST_COMPILE lowers XLA:CPU's code-generation effort: the same HLO programs (every
XLA pass that decides the arithmetic still runs), compiled by LLVM with less
optimisation, so tiny programs compile much faster and run somewhat slower.
"""
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
