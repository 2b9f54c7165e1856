"""Using a trained run: generation and chat with its training template, and embeddings."""
