"""Error measures shared by the parity tests."""
import numpy as np


def rel_err(ours, ref, where=None) -> float:
    """max|ours - ref| / max|ref| in float64, optionally over ``ref[where]`` only (e.g. non-padding positions)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    if where is not None:
        ours, ref = ours[where], ref[where]
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
