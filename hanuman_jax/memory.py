"""`python -m hanuman_jax.memory`: the memory plan of a config on a target device."""

import sys

from hanuman_jax.planning.memory import main

if __name__ == "__main__":
    sys.exit(main())
