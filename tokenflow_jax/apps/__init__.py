"""Applications on top of the recipes: the demo (and its report), AOT compiles for TPU slices, weight
conversion commands."""
