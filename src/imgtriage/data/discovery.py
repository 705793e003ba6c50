"""Find labelled samples: class folders (with or without train/val/test) or CSV/JSONL manifests."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imgtriage.errors import DataError
from imgtriage.io import Defect, check_format, is_supported_path

SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test", "calib": "calib",
                 "calibration": "calib"}


@dataclass(frozen=True)
class Sample:
    """One labelled file. ``split`` is None until assigned; ``group`` keeps relatives together."""

    path: str
    label: str
    group: str | None = None
    split: str | None = None


@dataclass(frozen=True)
class Dataset:
    """Samples plus the class names in output order (sorted, stable across runs).

    ``ignored`` lists what was found and left out on purpose (path, reason: hidden files,
    files outside class folders, run folders); ``defects`` the files of class folders whose
    bytes are not an image imgtriage reads, with the defect reading them gives (the same
    issue and message as ``predict``). Never dropped silently: the run directory records both.
    """

    samples: tuple[Sample, ...]
    classes: tuple[str, ...]
    ignored: tuple[tuple[str, str], ...] = field(default=())
    defects: tuple[Defect, ...] = field(default=())

    def counts(self) -> dict[str, int]:
        c = Counter(s.label for s in self.samples)
        return {k: c.get(k, 0) for k in self.classes}

    def subset(self, split: str) -> list[Sample]:
        return [s for s in self.samples if s.split == split]

    def found_rows(self) -> list[dict[str, str]]:
        """``{path, issue, message}`` of every file found and not used (for defects.json):
        the non-images with their reading defect, then what was left out on purpose."""
        return [*(d.to_dict() for d in self.defects),
                *({"path": p, "issue": "unsupported_format", "message": why}
                  for p, why in self.ignored)]


def iter_image_files(root: str | os.PathLike[str], *, include_hidden: bool = False,
                     on_hidden: Callable[[Path], None] | None = None,
                     on_folder: Callable[[Path, str], None] | None = None,
                     yield_folders: bool = False) -> Iterator[Path]:
    """Every file below ``root`` in a stable (sorted, depth-first) order, as a stream.

    Hidden entries (names starting with ".") are yielded with ``include_hidden``; otherwise
    they are skipped and each one (a file, or a hidden folder as a whole) is passed to
    ``on_hidden``, so a caller can say what it left out. Links to folders are not followed
    and folders that cannot be listed are not entered: each is passed to ``on_folder`` with
    the reason, or, with ``yield_folders``, yielded itself (it then becomes a defect), so
    no file vanishes without a word. The walk is iterative: any depth of nesting works.
    """
    root = Path(root)
    if root.is_file():
        yield root
        return
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            yield from _skipped_folder(folder, f"cannot be listed ({exc.strerror})",
                                       on_folder, yield_folders and folder != root)
            continue
        subdirs = []
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith(".") and not include_hidden:
                if on_hidden is not None:
                    on_hidden(path)
            elif _is_folder(entry, follow=False):
                subdirs.append(path)
            elif entry.is_symlink() and _is_folder(entry, follow=True):
                yield from _skipped_folder(path, "is a link to a folder (links are not "
                                           "followed)", on_folder, yield_folders)
            else:
                yield path
        stack.extend(reversed(subdirs))


def _is_folder(entry: os.DirEntry, *, follow: bool) -> bool:
    try:
        return entry.is_dir(follow_symlinks=follow)
    except OSError:
        return False


def _skipped_folder(path: Path, why: str, on_folder: Callable[[Path, str], None] | None,
                    yield_it: bool) -> Iterator[Path]:
    if on_folder is not None:
        on_folder(path, why)
    if yield_it:
        yield path


def _class_dirs(root: Path, ignored: list[tuple[str, str]] | None = None) -> list[Path]:
    """The folders under ``root`` that can be classes (or splits): not hidden, and not what
    imgtriage itself wrote there (a run directory given as --out inside the data folder
    would otherwise come back as a class of curves and plots); those go to ``ignored``."""
    dirs = []
    for p in sorted(root.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        what = _output_folder(p)
        if what is None:
            dirs.append(p)
        elif ignored is not None:
            ignored.append((str(p), f"{what}, not a class folder: its files were not used "
                                    "(keep --out outside the data folder)"))
    return dirs


def _output_folder(path: Path) -> str | None:
    """What imgtriage output ``path`` is (a run directory, a bundle, an evaluation), or None."""
    if (path / "splits.csv").is_file() and (path / "config.json").is_file():
        return "an imgtriage run directory"
    if (path / "manifest.json").is_file() and any(
            f.suffix in (".safetensors", ".onnx") for f in path.iterdir()):
        return "an imgtriage bundle"
    if (path / "report.json").is_file() and (path / "report.html").is_file():
        return "an imgtriage evaluation report"
    return None


def _scan_class_folders(root: Path, split: str | None, ignored: list[tuple[str, str]],
                        defects: list[Defect]) -> list[Sample]:
    samples = []

    def hidden(path: Path) -> None:
        ignored.append((str(path), "hidden (its name starts with '.'); rename it to train on it"))

    def folder(path: Path, why: str) -> None:
        ignored.append((str(path), f"a folder that {why}; its files were not used"))

    for cdir in _class_dirs(root, ignored):
        found = len(samples)
        for f in iter_image_files(cdir, on_hidden=hidden, on_folder=folder):
            defect = None if is_supported_path(f) else check_format(f)
            if defect is None:
                samples.append(Sample(str(f), cdir.name, None, split))
            else:
                defects.append(defect)
        if len(samples) == found:
            ignored.append((str(cdir), f"{NO_IMAGES}; no class {cdir.name!r} from it (give it "
                                       "image files to train the class)"))
    return samples


NO_IMAGES = "a class folder without image files"


def _from_folders(root: Path
                  ) -> tuple[list[Sample], list[tuple[str, str]], list[Defect]]:
    ignored: list[tuple[str, str]] = []
    defects: list[Defect] = []
    subdirs = {p.name.lower(): p for p in _class_dirs(root)}
    split_dirs = {SPLIT_ALIASES[k]: p for k, p in subdirs.items() if k in SPLIT_ALIASES}
    _check_not_mixed(root, split_dirs, subdirs)
    if split_dirs and len(split_dirs) == len(subdirs):
        samples = []
        for split, p in sorted(split_dirs.items()):
            samples += _scan_class_folders(p, split, ignored, defects)
    else:
        samples = _scan_class_folders(root, None, ignored, defects)
    reported = {p for p, _ in ignored}
    for f in sorted(root.iterdir()):
        if f.is_dir() and str(f) not in reported and (what := _output_folder(f)):
            ignored.append((str(f), f"{what}, not a split or class folder: its files were not "
                                    "used (keep --out outside the data folder)"))
        elif f.is_file() and not f.name.startswith("."):
            ignored.append((str(f), "file outside any class folder"))
        elif f.name.startswith("."):
            ignored.append((str(f), "hidden (its name starts with '.'); not searched"))
    return samples, ignored, defects


def _check_not_mixed(root: Path, split_dirs: dict[str, Path], subdirs: dict[str, Path]
                     ) -> None:
    """Split folders holding class folders beside other folders: read as classes, 'train' and
    'val' would become two classes of every image under them; say what to move instead."""
    others = sorted(p.name for k, p in subdirs.items() if k not in SPLIT_ALIASES)
    nested = [p.name for p in split_dirs.values() if _class_dirs(p)]
    if others and nested:
        raise DataError(f"{root} holds split folders with class folders in them "
                        f"({', '.join(sorted(nested))}) beside other folders "
                        f"({', '.join(others)}); a split layout holds only train/ val/ test/, "
                        "each with class folders: move the others into a split (e.g. "
                        f"train/{others[0]}) or out of {root}")


def manifest_rows(path: Path) -> Iterable[tuple[int, dict[str, str]]]:
    """``(line number, row)`` of every record, so an error can name the line to fix."""
    if path.suffix.lower() == ".jsonl":
        with path.open() as fh:
            for i, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{i}: not valid JSON ({exc.msg})") from exc
                    if not isinstance(row, dict):
                        raise DataError(f"{path}:{i}: not a JSON object; write one "
                                        '{"path": ..., "label": ...} object per line')
                    yield i, row
    else:
        # surrogateescape: file names that are not UTF-8 read back exactly as written;
        # utf-8-sig: the byte-order mark spreadsheets write does not become part of "path"
        with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
            delimiter = _delimiter(fh.readline())
            fh.seek(0)
            reader = csv.DictReader(fh, delimiter=delimiter)
            reader.fieldnames = _column_names(reader.fieldnames or [])
            for row in reader:
                yield reader.line_num, row


_COLUMNS = ("path", "label", "group", "split")


def _delimiter(header: str) -> str:
    """',' unless the header line is split by ';' or tabs only (spreadsheets in locales
    whose decimal mark is a comma write ';')."""
    for sep in (",", ";", "\t"):
        if sep in header:
            return sep
    return ","


def _column_names(names: Sequence[str]) -> list[str]:
    """The header with the known columns matched whatever their case and spacing ('Path',
    ' label'); other columns (features of fusion manifests) keep their names."""
    return [n.strip().lower() if n.strip().lower() in _COLUMNS else n for n in names]


def manifest_path(path: str | os.PathLike[str]) -> str:
    """How a manifest row names ``path`` so that :func:`discover` finds it again wherever the
    manifest is written: an absolute path (a relative one would be read relative to the
    manifest's folder, not to the folder the run started in)."""
    return os.path.abspath(path)


def write_manifest(path: str | os.PathLike[str], paths: Sequence[str],
                   labels: Sequence[str]) -> Path:
    """Write a ``path,label`` CSV manifest that :func:`discover` reads back (parent folders
    are created; relative paths are made absolute, see :func:`manifest_path`). Returns the path.

    Example:
        >>> write_manifest("labels.csv", ["a.png", "b.png"], ["cat", "dog"])  # doctest: +SKIP
    """
    if len(paths) != len(labels):
        raise DataError(f"{len(paths)} paths but {len(labels)} labels: one label per path")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        w = csv.writer(fh)  # names that are not UTF-8 are written as their own bytes
        w.writerow(["path", "label"])
        w.writerows((manifest_path(p), lab) for p, lab in zip(paths, labels, strict=True))
    return out


def _from_manifest(path: Path) -> list[Sample]:
    samples = []
    first_row: dict[str, int] = {}
    for i, row in manifest_rows(path):
        sample = _manifest_sample(path, i, row)
        key = os.path.normpath(sample.path)
        if key in first_row:
            raise DataError(f"{path}: lines {first_row[key]} and {i} both list {sample.path}; "
                            "list each file once (a file in train and val would be scored "
                            "on what the model was trained on)")
        first_row[key] = i
        samples.append(sample)
    return samples


def _manifest_sample(path: Path, i: int, row: dict[str, str]) -> Sample:
    """The row at line ``i`` of the manifest ``path`` as a Sample; an unusable row says why."""
    if "path" not in row or "label" not in row:
        raise DataError(f"{path}:{i}: the row lacks 'path' or 'label' (columns found: "
                        f"{sorted(k for k in row if k is not None)}); a manifest needs columns "
                        "path,label and optionally group,split")
    label, file = row["label"], row["path"]
    if label is None or str(label).strip() == "":
        raise DataError(f"{path}:{i}: the row has no label; fill it in or remove the row "
                        "(unlabelled images go in a folder given to --unlabeled)")
    if not isinstance(file, str) or not file.strip():
        raise DataError(f"{path}:{i}: the row has no path; give the image file's path "
                        "(relative to the manifest's folder, or absolute) or remove the row")
    p = Path(file)
    if not p.is_absolute():
        p = path.parent / p
    split = row.get("split") or None
    if split is not None:
        if split.lower() not in SPLIT_ALIASES:
            raise DataError(f"{path}:{i}: unknown split {split!r}; use train/val/test")
        split = SPLIT_ALIASES[split.lower()]
    return Sample(str(p), str(label), row.get("group") or None, split)


def discover(source: str | os.PathLike[str], *, min_classes: int = 2) -> Dataset:
    """Build a :class:`Dataset` from a class-folder tree or a CSV/JSONL manifest.

    Layouts: ``root/<class>/*.png``, ``root/{train,val,test}/<class>/*``, or a manifest file
    with columns ``path,label[,group][,split]`` (relative paths are relative to the manifest).
    Training needs two classes at least; labelled data to evaluate a bundle on may hold one
    (``min_classes=1``).

    Example:
        >>> ds = discover("data/digits")  # doctest: +SKIP
        >>> ds.classes  # doctest: +SKIP
        ('0', '1', ...)
    """
    src = Path(source)
    if not src.exists():
        raise DataError(f"dataset path {src} does not exist; pass a folder of class folders "
                        "or a .csv/.jsonl manifest")
    if src.is_file():
        if src.suffix.lower() not in (".csv", ".jsonl"):
            raise DataError(f"{src} is a file but not a .csv or .jsonl manifest")
        samples, ignored, defects = _from_manifest(src), [], []
    else:
        samples, ignored, defects = _from_folders(src)
    if not samples:
        raise DataError(f"no labelled images found under {src}; expected class folders "
                        f"(e.g. {src}/cat/*.png) or a manifest with path,label columns")
    classes = tuple(sorted({s.label for s in samples}))
    if len(classes) < min_classes:
        empty = [Path(p).name for p, why in ignored if why.startswith(NO_IMAGES)]
        raise DataError(f"found only one class ({classes[0]!r}) under {src}; "
                        "a classifier needs at least two"
                        + (f" (class folders without image files: {', '.join(empty)})"
                           if empty else ""))
    return Dataset(tuple(samples), classes, tuple(ignored), tuple(defects))
