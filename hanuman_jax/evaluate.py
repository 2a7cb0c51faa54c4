"""`python -m hanuman_jax.evaluate`: held-out loss and bits per byte of a checkpoint."""

import sys

from hanuman_jax.inference.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
