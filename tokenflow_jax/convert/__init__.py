"""Weight import and export (HF transformers towers, official TokenFlow checkpoints)."""
