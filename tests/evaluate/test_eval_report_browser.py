"""The HTML evaluation report opens in a real headless Chromium with no console errors and
every embedded image rendered."""

from __future__ import annotations

import numpy as np
from PIL import Image

from browser import console_errors, headless_chromium
from imgtriage.evaluate import write_report


def test_report_renders_in_chromium(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(24):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    paths[-1] = tmp_path / "missing.png"  # one unreadable file: a placeholder, never a crash
    labels = np.arange(24) % 3
    logits = rng.normal(size=(24, 3)) + 0.8 * np.eye(3)[labels]  # some mistakes to show
    out = tmp_path / "eval"
    write_report(out, logits=logits, labels=labels, class_names=["cat", "dog", "<b>x</b>"],
                 paths=paths)
    with headless_chromium() as driver:
        driver.get((out / "report.html").as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        assert len(images) >= 5
        assert all(complete and width > 0 for complete, width in images)
        # a class name with markup shows as text: escaped, never interpreted
        assert driver.execute_script("return document.body.innerText.includes('<b>x</b>')")
        assert console_errors(driver) == []
        shot = tmp_path / "report.png"
        driver.save_screenshot(str(shot))
    img = np.asarray(Image.open(shot).convert("L"))
    assert img.std() > 10  # a real page, not a blank one
