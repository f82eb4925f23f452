"""The compatibility block of `lerax_utils.py`: each feature test and private API it
relies on still behaves as the block assumes, so a new release that changes one fails
here, by name, rather than somewhere deep in another suite."""

import lerax_utils  # noqa: F401

# -- Control flow

# -- Batches of pytrees

# -- Host callbacks and progress bars

# -- Checkpoints

# (end of compatibility tests)
