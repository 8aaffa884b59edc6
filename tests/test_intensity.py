import numpy as np
import pytest
import torch

from voldit.data.intensity import (
    HU_MAX,
    HU_MIN,
    hu_counts,
    hu_edges,
    hu_to_unit,
    unit_to_hu,
    unit_to_hu_int16,
)


def test_window_endpoints_and_clipping():
    hu = np.array([-3000, -1000, 0, 1000, 3071], dtype=np.int16)
    np.testing.assert_allclose(hu_to_unit(hu), [-1, -1, 0, 1, 1])


def test_exact_round_trip_inside_the_window():
    hu = torch.arange(HU_MIN, HU_MAX + 1, 1.0)
    back = unit_to_hu(hu_to_unit(hu))
    assert torch.max(torch.abs(back - hu)) < 1e-3
    assert np.array_equal(unit_to_hu_int16(hu_to_unit(hu)), hu.numpy().astype(np.int16))


def test_inverse_is_fixed_not_per_image():
    # An image that uses only part of the range keeps its HU values (the reference rescaled per image).
    hu = np.array([-200.0, 40.0, 300.0])
    np.testing.assert_allclose(unit_to_hu(hu_to_unit(hu)), hu, atol=1e-3)


def test_output_stays_in_range_and_int16():
    out = unit_to_hu_int16(torch.tensor([-1.7, 0.25, 1.3]))
    assert out.dtype == np.int16 and out.tolist() == [-1000, 250, 1000]


def test_tensor_and_array_inputs_round_alike():
    """Tensors are converted with torch (all cores), arrays with numpy: the voxels must be identical,
    halves included (both round half to even)."""
    x = torch.cat([torch.rand(100_000) * 2.2 - 1.1, torch.tensor([0.0025, -0.0025, 0.0015, 0.0005])])
    before = x.clone()
    assert np.array_equal(unit_to_hu_int16(x), unit_to_hu_int16(x.numpy()))
    assert unit_to_hu_int16(x).dtype == np.int16
    assert torch.equal(x, before)  # the conversion works in place on its own copy, never the caller's


@pytest.mark.parametrize("bin_width", [10, 20.0])
def test_histogram_bins_match_numpy_at_every_edge(bin_width):
    """The quality gate and the evaluation count the window alike, and as np.histogram does on the
    clipped values, also for the floats one ulp either side of each edge."""
    edges = hu_edges(bin_width)
    assert edges[0] == HU_MIN and edges[-1] == HU_MAX and np.all(np.diff(edges) == bin_width)
    at = edges.astype(np.float32)
    near = np.concatenate([np.nextafter(at, -np.inf), at, np.nextafter(at, np.inf), [-3000, 3071]])
    hu = np.concatenate([np.random.default_rng(0).normal(0, 700, 10_000), near]).astype(np.float32)
    expected = np.histogram(np.clip(hu, HU_MIN, HU_MAX), bins=edges)[0]
    assert np.array_equal(hu_counts(hu, bin_width), expected)
    assert np.array_equal(
        hu_counts(hu.astype(np.int16), bin_width),
        np.histogram(np.clip(hu.astype(np.int16), HU_MIN, HU_MAX), bins=edges)[0],
    )
    with pytest.raises(ValueError, match="does not divide the window"):
        hu_edges(30)
