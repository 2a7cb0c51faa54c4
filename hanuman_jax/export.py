"""`python -m hanuman_jax.export`: a checkpoint as a Hugging Face transformers model folder."""

import sys

from hanuman_jax.hf.export import main

if __name__ == "__main__":
    sys.exit(main())
