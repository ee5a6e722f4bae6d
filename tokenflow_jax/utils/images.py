"""Image helpers for previews and sample sheets."""
from __future__ import annotations

import numpy as np


def image_grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Rows of uint8 image batches [N, H, W, 3] -> one uint8 grid image (white padding)."""
    n, h, w, c = rows[0].shape
    grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), 255, np.uint8)
    for r, batch in enumerate(rows):
        for i, img in enumerate(batch):
            top, left = pad + r * (h + pad), pad + i * (w + pad)
            grid[top : top + h, left : left + w] = img
    return grid
