"""Where `config.scan_layers` puts a stack's layers: `.../layers/block/...`.

These two names are part of the saved format, so they live apart from the code
that builds the stacks:
- checkpoints of a scanned model hold the stacked `[num_layers, ...]` parameters
  under `<stack>/layers/block/...` (`stacks.stack_layers` / `unstack_layers`
  convert to and from the unrolled `layer_0 ... layer_{L-1}` tree);
- `training.metrics.grouped_norms` finds the stacked layers by these names to
  report one gradient/update norm per layer, as in the unrolled tree;
- HF import/export maps the unrolled tree, and names a scanned one in its errors;
- Performer's random features are seeded from a module's path without its layer
  (`layer_<i>` or these two names), so that both layouts draw the same ones.
Renaming either breaks saved checkpoints and per-layer metrics.
"""

SCAN_NAME = "layers"   # the `nn.scan` module: its variables get a leading [L] axis
SCAN_BLOCK = "block"   # the block inside each scan step
