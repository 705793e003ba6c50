"""Discovery, splits and the one file -> model-input function."""

from imgtriage.data.discovery import Dataset, Sample, discover, iter_image_files, write_manifest
from imgtriage.data.duplicates import DuplicateCheck, check_duplicates
from imgtriage.data.preprocess import PreprocessSpec, load_input, load_record, to_input
from imgtriage.data.splits import samples_by_split, split_dataset, write_split_manifest

__all__ = [
    "Dataset",
    "DuplicateCheck",
    "PreprocessSpec",
    "Sample",
    "check_duplicates",
    "discover",
    "iter_image_files",
    "load_input",
    "load_record",
    "samples_by_split",
    "split_dataset",
    "to_input",
    "write_manifest",
    "write_split_manifest",
]
