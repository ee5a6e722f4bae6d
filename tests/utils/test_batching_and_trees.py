"""utils/: ragged-batch padding and tree differences."""
import jax
import numpy as np
import pytest

from tokenflow_jax.utils import batching, trees


def test_pad_rows_repeats_the_last_row_of_lists_and_arrays():
    assert batching.pad_rows(["a", "b"], 4) == ["a", "b", "b", "b"]
    array = np.arange(6).reshape(3, 2)
    padded = batching.pad_rows(array, 5)
    np.testing.assert_array_equal(padded, [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]])
    assert batching.pad_rows(array, 3) is array
    assert (batching.round_up(0, 8), batching.round_up(9, 8), batching.round_up(16, 8)) == (0, 16, 16)
    with pytest.raises(ValueError, match="cannot pad 3 rows to 2"):
        batching.pad_rows([1, 2, 3], 2)
    with pytest.raises(ValueError, match="cannot pad 0 rows"):
        batching.pad_rows([], 2)


def test_bucket_length_pads_at_most_an_eighth_onto_a_few_lengths_per_octave():
    assert [batching.bucket_length(n) for n in (0, 1, 8, 9, 16, 17, 65, 80, 81, 104, 1000, 1025)] == [
        0, 1, 8, 9, 16, 18, 72, 80, 88, 104, 1024, 1152]
    lengths = range(1, 5000)
    buckets = [batching.bucket_length(n) for n in lengths]
    assert all(n <= b <= n + max(n // 8, 1) for n, b in zip(lengths, buckets))
    assert all(batching.bucket_length(b) == b for b in buckets)  # a bucket is its own bucket
    assert len(set(buckets[2048:4096])) == 8  # n = 2049..4096: eight lengths, 2304 to 4096
    assert batching.bucket_length(100, per_octave=4) == 112


def test_shape_differences_lists_missing_unexpected_and_mismatched_leaves():
    found = {"a": np.zeros((2, 3)), "b": {"c": np.zeros(4)}, "extra": np.zeros(1)}
    expected = {"a": jax.ShapeDtypeStruct((2, 3), np.float32), "b": {"c": np.zeros(5), "d": np.zeros(())}}
    assert trees.shape_differences(found, expected) == [
        ("b/c", "expected shape (5,), found (4,)"),
        ("b/d", "missing (expected shape ())"),
        ("extra", "unexpected (found shape (1,))"),
    ]
    assert trees.shape_differences(expected, expected) == []
