"""Checkpoints on disk: a step's files, manifest and metadata (files), training's save and resume
(manager), and reading parameters back (restore)."""
