"""Byte-identical files across splits: found by content, validation copies removed."""

from __future__ import annotations

import shutil
from pathlib import Path

from imgtriage.data import check_duplicates, discover, split_dataset
from imgtriage.data.duplicates import content_digest, unpack_digests
from shared_helpers import write_digits_folder


def _split_layout(root: Path) -> Path:
    src = write_digits_folder(root / "src", per_class=8, classes=(0, 1))
    for c in ("d0", "d1"):
        files = sorted((src / c).glob("*.png"))
        for split, part in (("train", files[:5]), ("val", files[5:7]), ("test", files[7:])):
            (root / "data" / split / c).mkdir(parents=True, exist_ok=True)
            for f in part:
                shutil.copy(f, root / "data" / split / c / f.name)
    return root / "data"


def test_copies_across_splits_are_found_by_content_not_name(tmp_path):
    data = _split_layout(tmp_path)
    t0 = sorted((data / "train" / "d0").glob("*.png"))
    shutil.copy(t0[0], data / "val" / "d0" / "copy_renamed.png")  # a val copy, new name
    shutil.copy(t0[1], data / "test" / "d0" / "again.png")  # a test copy
    shutil.copy(t0[2], data / "train" / "d1" / "mislabelled.png")  # same bytes, two labels
    ds = split_dataset(discover(data))
    n_val = len(ds.subset("val"))
    kept, dups = check_duplicates(ds)
    assert dups.val_copies == (str(data / "val" / "d0" / "copy_renamed.png"),)
    assert dups.test_copies == (str(data / "test" / "d0" / "again.png"),)
    assert [sorted(lab for _, lab in g) for g in dups.conflicts] == [["d0", "d1"]]
    assert {p for p, _ in dups.conflicts[0]} == {str(t0[2]),
                                                 str(data / "train" / "d1" / "mislabelled.png")}
    assert len(kept.subset("val")) == n_val - 1
    assert str(data / "val" / "d0" / "copy_renamed.png") not in {s.path for s in kept.samples}
    assert len(kept.subset("test")) == len(ds.subset("test"))  # test is only warned about
    s = dups.summary()
    assert (s["val_copies_removed"], s["test_copies_of_train"], s["label_conflicts"]) == (1, 1, 1)
    assert s["files_hashed"] == len(ds.samples)
    trained = unpack_digests(dups.train_digests)
    assert content_digest(t0[0]) in trained and len(trained) == 10  # 11 files, 1 copy
    lines = "\n".join(dups.lines())
    assert "again.png" in lines and "mislabelled.png (d1)" in lines


def test_keeping_val_copies_warns_and_clean_data_is_untouched(tmp_path):
    data = _split_layout(tmp_path)
    ds = split_dataset(discover(data))
    same, dups = check_duplicates(ds)
    assert same == ds and not (dups.val_copies or dups.test_copies or dups.conflicts)
    shutil.copy(next((data / "train" / "d1").glob("*.png")), data / "val" / "d1" / "c.png")
    ds = split_dataset(discover(data))
    kept, dups = check_duplicates(ds, drop_val_copies=False)
    assert kept == ds and len(dups.val_copies) == 1
    assert dups.summary()["val_copies_removed"] == 0
    assert any("validation images are byte copies" in line for line in dups.lines())
