import sys

from transformer_jax.run.cli import main

sys.exit(main())
