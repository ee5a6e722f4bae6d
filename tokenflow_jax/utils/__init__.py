"""Small helpers every layer may use (trees, ...); nothing here imports the rest of the package."""
