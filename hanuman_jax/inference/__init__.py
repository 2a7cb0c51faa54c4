"""Running a trained model: generation with a KV cache and held-out evaluation."""
