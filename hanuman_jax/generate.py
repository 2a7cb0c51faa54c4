"""`python -m hanuman_jax.generate`: text generation from a training run's checkpoint."""

import sys

from hanuman_jax.inference.generate import main

if __name__ == "__main__":
    sys.exit(main())
