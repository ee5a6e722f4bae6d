"""The image tokenizer recipe: training (GAN, LPIPS, semantic teacher), the frozen tokenizer the other recipes
load, reconstruction, evaluation and tokenising datasets."""
