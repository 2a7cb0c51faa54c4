"""Hugging Face interchange: the weight mapping, export to transformers and import back."""
