"""Preview pictures: where the slices go and that outlines follow the labels."""

import numpy as np

from voldit.previews import PANEL, _labelled_centre, preview


def test_slices_pass_through_the_median_labelled_voxel():
    rng = np.random.default_rng(0)
    labels = np.zeros((40, 30, 20), np.int32)
    labels[rng.random(labels.shape) < 0.01] = 3
    labels[5:9, 20:25, 2:4] = 7
    coords = np.nonzero(labels)
    # the lower median of each axis' coordinates (the middle voxel for an odd count)
    expected = [int(np.sort(axis)[(len(axis) - 1) // 2]) for axis in coords]
    assert _labelled_centre(labels) == expected
    assert _labelled_centre(np.zeros((4, 4, 4))) is None


def test_preview_has_an_outline_row_and_handles_an_empty_mask():
    volume = np.full((32, 32, 16), -1000, np.int16)
    volume[8:24, 8:24, 4:12] = 40
    labels = (volume > 0).astype(np.int32)
    with_mask = preview(volume, np.diag([1.0, 1.0, 2.0, 1.0]), labels, title="x")
    plain = preview(volume, np.eye(4))
    assert plain.size == (3 * PANEL, PANEL)
    assert with_mask.size == (3 * PANEL, 2 * PANEL + 14)  # the title's band on top
    empty = preview(volume, np.eye(4), np.zeros_like(labels))  # nothing labelled: the volume's middle
    assert empty.size == (3 * PANEL, 2 * PANEL)
