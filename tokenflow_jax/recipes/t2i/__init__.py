"""Text-to-image: next-scale prediction over the tokenizer's codes (setup, token shards, training, batch
sampling, ShapesEval)."""
