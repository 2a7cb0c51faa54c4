"""Checkpoints on disk: the training state's save and resume, and reading parameters back."""
