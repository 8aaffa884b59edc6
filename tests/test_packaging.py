"""Packaging: pyproject.toml reads without setuptools deprecation warnings."""

import warnings

import pytest

from tests.conftest import ROOT


@pytest.mark.deadline(60)
def test_pyproject_reads_without_deprecation_warnings():
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert [str(w.message).splitlines()[0] for w in caught if "license" in str(w.message).lower()] == []
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"  # an SPDX expression
    # SPDX license strings need setuptools 77; the isolated build must not pick an older one.
    assert "setuptools>=77" in project["build-system"]["requires"]
