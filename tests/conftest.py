import os
import sys

# Tests run on the CPU with one device unless a test starts its own process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))
