"""Read any supported image file into ``(array, metadata)``, or say exactly why not.

No torch here: readers return NumPy arrays in the file's own dtype and an
:class:`ImageRecord`; a file that cannot be read becomes a typed :class:`Defect`
(``try_read_image``) or raises :class:`~imgtriage.errors.ImageReadError` carrying one
(``read_image``).

Example:
    >>> from imgtriage.io import read_image, try_read_image, ReadPolicy
    >>> policy = ReadPolicy(multipage="first")
    >>> rec = read_image("frames/m13.fits.gz", policy=policy)  # doctest: +SKIP
    >>> rec.meta["format"], rec.meta["header"]["EXPTIME"]  # doctest: +SKIP
    ('fits', 30.0)
"""

from imgtriage.io._digest import sha256_file
from imgtriage.io._reader import check_format, read_array, read_image, try_read_image
from imgtriage.io._sniff import SUPPORTED_EXTENSIONS, is_supported_path, sniff_format
from imgtriage.io._types import DEFECT_ISSUES, Defect, DefectIssue, ImageRecord, ReadPolicy

__all__ = [
    "DEFECT_ISSUES",
    "SUPPORTED_EXTENSIONS",
    "Defect",
    "DefectIssue",
    "ImageRecord",
    "ReadPolicy",
    "check_format",
    "is_supported_path",
    "read_array",
    "read_image",
    "sha256_file",
    "sniff_format",
    "try_read_image",
]
