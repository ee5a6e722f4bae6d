"""Numerics that must match the PyTorch reference exactly."""
