"""Real example CTs with organ label maps, taken from the TotalSegmentator source package on PyPI.

The sdist of totalsegmentator 2.18.0 ships small CT volumes and their segmentations in
``tests/reference_files``. Data licence: CC BY 4.0, TotalSegmentator dataset (Wasserthal et al., 2023).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE = "totalsegmentator==2.18.0"
_PREFIX = "totalsegmentator-2.18.0/tests/reference_files/"
# (image, label map): a 122x101x30 CT at 3 mm, and the 122x101x112 CT with its split-organ labels.
EXAMPLES = {
    "example_ct_sm": ("example_ct_sm.nii.gz", "example_seg.nii.gz"),
    "example_ct": ("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"),
}


def fetch_examples(dest: str | Path) -> dict[str, tuple[Path, Path]]:
    """Make sure the example (image, mask) pairs are in ``dest``; download the sdist once if not."""
    dest = Path(dest)
    wanted = {name: (dest / image, dest / mask) for name, (image, mask) in EXAMPLES.items()}
    if all(p.is_file() for pair in wanted.values() for p in pair):
        return wanted
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log.info("downloading %s (sdist, about 38 MB) for its example CTs", PACKAGE)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                PACKAGE,
                "-d",
                tmp,
            ],
            check=True,
        )
        (archive,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(archive) as tar:
            for image, mask in EXAMPLES.values():
                for name in (image, mask):
                    member = tar.extractfile(_PREFIX + name)
                    part = dest / f".{name}.part"
                    part.write_bytes(member.read())
                    part.replace(dest / name)
    return wanted
