import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgtriage.data import discover, split_dataset, write_manifest, write_split_manifest
from imgtriage.errors import ConfigError, DataError


def _png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def test_class_folders_sorted_and_unsupported_files_reported(tmp_path):
    for c in ("zebra", "ant"):
        for i in range(3):
            _png(tmp_path / c / f"{i}.png", i)
    (tmp_path / "ant" / "notes.txt").write_text("x")
    (tmp_path / "stray.png").write_bytes(b"")
    ds = discover(tmp_path)
    assert ds.classes == ("ant", "zebra")
    assert ds.counts() == {"ant": 3, "zebra": 3}
    ignored = dict(ds.ignored)
    (notes,) = ds.defects  # the bytes decide: a text file is no image, whatever its name
    assert (notes.path, notes.issue) == (str(tmp_path / "ant" / "notes.txt"),
                                         "unsupported_format")
    assert "is not an image format imgtriage reads" in notes.message
    assert "outside any class folder" in ignored[str(tmp_path / "stray.png")]
    assert {r["path"] for r in ds.found_rows()} == {notes.path, str(tmp_path / "stray.png")}


@pytest.mark.parametrize("split_layout", [False, True])
def test_a_run_directory_inside_the_data_folder_is_not_a_class(tmp_path, split_layout):
    data = tmp_path / "train" if split_layout else tmp_path
    for c in ("a", "b"):
        _png(data / c / "0.png")
    if split_layout:
        _png(tmp_path / "val" / "a" / "1.png")
    run = tmp_path / "runs"  # `imgtriage train DATA --out DATA/runs`, then train DATA again
    _png(run / "curves.png")
    (run / "config.json").write_text("{}")
    (run / "splits.csv").write_text("path,label\n")
    _png(run / "bundle" / "x.png")
    (run / "bundle" / "manifest.json").write_text("{}")
    (run / "bundle" / "weights.safetensors").write_bytes(b"")
    (data / "b" / "manifest.json").write_text("{}")  # a data set's own file: still a class
    ds = discover(tmp_path)
    assert ds.classes == ("a", "b")
    assert {s.split for s in ds.samples} == ({"train", "val"} if split_layout else {None})
    assert "an imgtriage run directory, not a" in dict(ds.ignored)[str(run)]


def test_files_are_images_by_their_bytes_not_their_names(tmp_path):
    for c in ("a", "b"):
        _png(tmp_path / c / "0.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "a" / "no_ext").write_bytes((tmp_path / "a" / "0.png").read_bytes())
    (tmp_path / "a" / "README").write_text("scanned on 2026-12-01")
    ds = discover(tmp_path)
    assert "no class 'empty' from it" in dict(ds.ignored)[str(tmp_path / "empty")]
    assert str(tmp_path / "a" / "no_ext") in {s.path for s in ds.samples}  # a PNG: used
    assert [(d.path, d.issue) for d in ds.defects] == [(str(tmp_path / "a" / "README"),
                                                       "unsupported_format")]
    (tmp_path / "b" / "0.png").rename(tmp_path / "b" / "0.txt")  # still a PNG: still used
    assert discover(tmp_path).counts() == {"a": 2, "b": 1}
    (tmp_path / "b" / "0.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"only one class \('a'\).*without image files: b, empty"):
        discover(tmp_path)


def test_predefined_splits_kept(tmp_path):
    for split in ("train", "val", "test"):
        for c in ("a", "b"):
            _png(tmp_path / split / c / "x.png")
    ds = split_dataset(discover(tmp_path), val_frac=0.5, seed=0)
    assert Counter(s.split for s in ds.samples) == {"train": 2, "val": 2, "test": 2}


def test_csv_and_jsonl_manifests(tmp_path):
    _png(tmp_path / "img" / "1.png")
    _png(tmp_path / "img" / "2.png")
    with (tmp_path / "m.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group", "split"])
        w.writerow(["img/1.png", "cat", "g1", "train"])
        w.writerow(["img/2.png", "dog", "", "validation"])
    ds = discover(tmp_path / "m.csv")
    assert [(s.label, s.group, s.split) for s in ds.samples] == [
        ("cat", "g1", "train"), ("dog", None, "val")]
    assert ds.samples[0].path == str(tmp_path / "img" / "1.png")
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"path": "img/1.png", "label": "cat"}, {"path": "img/2.png", "label": "dog"}]))
    assert discover(tmp_path / "m.jsonl").classes == ("cat", "dog")


@pytest.mark.parametrize("content, match", [
    ("path\nimg.png\n", "lacks 'path' or 'label'"),
    ("path,label,split\na.png,x,holdout\n", "m.csv:2: unknown split"),
    ("path,label\na.png,x\nb.png,\n", "m.csv:3: the row has no label; fill it in"),
    ("path,label\na.png,x\nb.png\n", "m.csv:3: the row has no label"),
    ("path,label\na.png,x\n,y\n", "m.csv:3: the row has no path"),
    ("path,label\na.png,x\nimg/../a.png,y\n", "lines 2 and 3 both list"),
])
def test_bad_manifest_errors(tmp_path, content, match):
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(DataError, match=match):
        discover(tmp_path / "m.csv")


@pytest.mark.parametrize("header, sep, encoding", [
    ("path,label", ",", "utf-8-sig"),   # Excel's "CSV UTF-8": a byte-order mark first
    ("path;label", ";", "utf-8"),       # a locale whose decimal mark is a comma
    ("Path,Label ", ",", "utf-8"),      # capitalised, stray spaces
    ("path\tlabel", "\t", "utf-8"),
])
def test_manifests_as_spreadsheets_write_them(tmp_path, header, sep, encoding):
    for i in range(2):
        _png(tmp_path / f"{i}.png")
    rows = [header] + [f"{i}.png{sep}{'ab'[i]}" for i in range(2)]
    (tmp_path / "m.csv").write_text("\r\n".join(rows) + "\r\n", encoding=encoding)
    ds = discover(tmp_path / "m.csv")
    assert ds.classes == ("a", "b") and ds.samples[0].path == str(tmp_path / "0.png")


@pytest.mark.parametrize("lines, match", [
    ('{"path": "a.png", "label": "x"}\n\n{"path": "b.png", "label": null}\n',
     "m.jsonl:3: the row has no label"),
    ('{"path": "a.png", "label": "x"}\n["b.png", "y"]\n', "m.jsonl:2: not a JSON object"),
])
def test_bad_jsonl_manifest_errors_name_the_line(tmp_path, lines, match):
    (tmp_path / "m.jsonl").write_text(lines)
    with pytest.raises(DataError, match=match):
        discover(tmp_path / "m.jsonl")


def test_errors_for_missing_or_single_class(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "nope")
    _png(tmp_path / "only" / "a.png")
    with pytest.raises(DataError, match="only one class"):
        discover(tmp_path)


def _many(tmp_path, counts, groups=None):
    for c, n in counts.items():
        for i in range(n):
            _png(tmp_path / c / f"{i:03d}.png")
    return discover(tmp_path)


def test_split_is_stratified_seeded_and_complete(tmp_path):
    ds = _many(tmp_path, {"a": 40, "b": 20, "c": 10})
    s1 = split_dataset(ds, val_frac=0.2, test_frac=0.1, seed=3)
    s2 = split_dataset(ds, val_frac=0.2, test_frac=0.1, seed=3)
    s3 = split_dataset(ds, val_frac=0.2, test_frac=0.1, seed=4)
    assert [s.split for s in s1.samples] == [s.split for s in s2.samples]
    assert [s.split for s in s1.samples] != [s.split for s in s3.samples]
    assert len(s1.samples) == len(ds.samples)
    per = Counter((s.label, s.split) for s in s1.samples)
    assert (per["a", "val"], per["b", "val"], per["c", "val"]) == (8, 4, 2)
    assert (per["a", "test"], per["b", "test"], per["c", "test"]) == (4, 2, 1)


def test_groups_never_straddle_splits(tmp_path):
    rows = ["path,label,group"]
    for g in range(30):
        for k in range(3):
            p = tmp_path / f"g{g}_{k}.png"
            _png(p)
            rows.append(f"{p.name},{'a' if g % 2 else 'b'},grp{g}")
    (tmp_path / "m.csv").write_text("\n".join(rows))
    ds = split_dataset(discover(tmp_path / "m.csv"), val_frac=0.3, seed=0)
    by_group = {}
    for s in ds.samples:
        by_group.setdefault(s.group, set()).add(s.split)
    assert all(len(v) == 1 for v in by_group.values())
    assert {s.split for s in ds.samples} == {"train", "val"}


def test_split_manifest_round_trips(tmp_path):
    ds = split_dataset(_many(tmp_path / "d", {"a": 5, "b": 5}), val_frac=0.2, seed=0)
    path = write_split_manifest(ds, tmp_path / "run" / "splits.csv")
    again = discover(path)
    assert sorted((s.path, s.label, s.split) for s in again.samples) == sorted(
        (s.path, s.label, s.split) for s in ds.samples)


def test_bad_fractions_name_the_flag(tmp_path):
    ds = _many(tmp_path, {"a": 3, "b": 3})
    with pytest.raises(ConfigError, match="--val-frac"):
        split_dataset(ds, val_frac=0.7, test_frac=0.4)


def test_written_manifest_is_discovered_back(tmp_path):
    labels = ["cat", "dog", "cat", "dog"]
    paths = [str(tmp_path / "img" / f"{i}.png") for i in range(len(labels))]
    for i, p in enumerate(paths):
        _png(Path(p), i * 40)
    out = write_manifest(tmp_path / "new" / "labels.csv", paths, labels)
    ds = discover(out)
    assert list(ds.classes) == ["cat", "dog"]
    assert [(s.path, s.label) for s in ds.samples] == list(zip(paths, labels, strict=True))
    with pytest.raises(DataError, match="one label per path"):
        write_manifest(tmp_path / "bad.csv", paths, labels[:3])


def test_train_test_layout_gets_a_validation_split_carved_from_train(tmp_path):
    for split, n in (("train", 10), ("test", 4)):
        for c in ("a", "b"):
            for i in range(n):
                _png(tmp_path / split / c / f"{i}.png", i)
    ds = split_dataset(discover(tmp_path), val_frac=0.2, seed=0)
    per = Counter((s.label, s.split) for s in ds.samples)
    assert (per["a", "val"], per["b", "val"]) == (2, 2)
    assert (per["a", "train"], per["b", "train"]) == (8, 8)
    assert (per["a", "test"], per["b", "test"]) == (4, 4)  # the given test split is kept
    assert all("test" in s.path for s in ds.samples if s.split == "test")


def test_split_folders_beside_a_stray_folder_are_not_read_as_classes(tmp_path):
    for split in ("train", "val"):
        for c in ("a", "b"):
            _png(tmp_path / split / c / "0.png")
    _png(tmp_path / "extra" / "0.png")
    with pytest.raises(DataError, match=r"split folders with class folders in them \(train, "
                                        r"val\) beside other folders \(extra\).*train/extra"):
        discover(tmp_path)
    (tmp_path / "plain").mkdir()  # classes that happen to be named like splits stay classes
    for c in ("train", "cat"):
        _png(tmp_path / "plain" / c / "0.png")
    assert discover(tmp_path / "plain").classes == ("cat", "train")


def test_a_class_with_no_training_image_is_an_error_that_says_how_to_fix_it(tmp_path):
    for split, classes in (("train", "ab"), ("test", "abc")):
        for c in classes:
            for i in range(4):
                _png(tmp_path / split / c / f"{i}.png", i)
    with pytest.raises(DataError, match=r"\('c': 4 in test\).*evaluate --ood"):
        split_dataset(discover(tmp_path), val_frac=0.2, seed=0)
    rows = ["path,label,split"] + [f"{split}/{c}/{i}.png,{c},{'val' if c == 'c' else ''}"
                                   for split in ("train", "test") for c in "abc"
                                   for i in range(4) if (split, c) != ("train", "c")]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"'c': 4 in val"):
        split_dataset(discover(tmp_path / "m.csv"), val_frac=0.2, seed=0)


def test_manifest_with_train_and_test_only_gets_groups_kept_together_in_val(tmp_path):
    rows = ["path,label,group,split"]
    for g in range(20):
        for k in range(2):
            p = tmp_path / f"g{g}_{k}.png"
            _png(p)
            rows.append(f"{p.name},{'a' if g % 2 else 'b'},grp{g},{'test' if g < 4 else 'train'}")
    (tmp_path / "m.csv").write_text("\n".join(rows))
    ds = split_dataset(discover(tmp_path / "m.csv"), val_frac=0.25, seed=0)
    splits = Counter(s.split for s in ds.samples)
    assert splits["val"] > 0 and splits["test"] == 8
    by_group = {}
    for s in ds.samples:
        by_group.setdefault(s.group, set()).add(s.split)
    assert all(len(v) == 1 for v in by_group.values())


def test_a_grouping_that_leaves_validation_empty_says_how_to_fix_it(tmp_path):
    rows = ["path,label,group"]
    for i in range(8):  # one group per class: a group cannot be split
        p = tmp_path / f"{i}.png"
        _png(p)
        rows.append(f"{p.name},{'a' if i % 2 else 'b'},{'ga' if i % 2 else 'gb'}")
    (tmp_path / "m.csv").write_text("\n".join(rows))
    with pytest.raises(DataError, match=r"val split came out empty.*group.*split=val"):
        split_dataset(discover(tmp_path / "m.csv"), val_frac=0.2, seed=0)


def test_names_that_are_not_utf8_and_hidden_files_in_class_folders(tmp_path):
    import os

    from PIL import Image

    from imgtriage.data import discover, write_manifest

    root = tmp_path / "data"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), i).save(root / label / f"{i}.png")
    raw = os.fsencode(root / "a") + b"/caf\xe9.png"
    with open(raw, "wb") as fh:
        fh.write((root / "a" / "0.png").read_bytes())
    (root / "b" / ".hidden.png").write_bytes((root / "b" / "0.png").read_bytes())
    ds = discover(root)
    assert os.fsdecode(raw) in [s.path for s in ds.samples]
    assert [p for p, why in ds.ignored if "hidden" in why] == [str(root / "b" / ".hidden.png")]
    back = discover(write_manifest(tmp_path / "m.csv", [s.path for s in ds.samples],
                                   [s.label for s in ds.samples]))
    assert sorted(s.path for s in back.samples) == sorted(s.path for s in ds.samples)


def test_links_to_folders_inside_class_folders_are_listed_as_ignored(tmp_path):
    from PIL import Image

    from imgtriage.data import discover

    root = tmp_path / "data"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        Image.new("L", (8, 8)).save(root / label / "0.png")
    (tmp_path / "more").mkdir()
    (root / "a" / "more").symlink_to(tmp_path / "more", target_is_directory=True)
    ds = discover(root)
    assert [(p, "link to a folder" in why) for p, why in ds.ignored] == [
        (str(root / "a" / "more"), True)]
