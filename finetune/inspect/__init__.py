"""Look inside a trained model (attention maps of a prompt, base against fine-tuned) to see what fine-tuning changed."""
