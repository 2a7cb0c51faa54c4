"""`python -m hanuman_jax.import_hf`: a Hugging Face model folder as a checkpoint to train on."""

import sys

from hanuman_jax.hf.importer import main

if __name__ == "__main__":
    sys.exit(main())
