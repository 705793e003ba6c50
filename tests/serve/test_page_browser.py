"""The web page in a real headless Chromium against a real `imgtriage serve`: pick an image,
see its class, score and probability bars; "unknown" when the model abstains; a defect shown
for a file that is no image. Saves screenshots (also to $IMGTRIAGE_SCREENSHOT_DIR if set)."""

from __future__ import annotations

import os
import shutil

import numpy as np
from PIL import Image

from browser import console_errors, headless_chromium

WAIT_S = 30


def cards_text(driver) -> list[dict]:
    return driver.execute_script("""
        return [...document.querySelectorAll('#results .result')].map(c => ({
          name: c.querySelector('.name').textContent,
          cls: c.querySelector('.cls').textContent,
          score: c.querySelector('.score').textContent,
          note: c.querySelector('.note').textContent,
          bars: c.querySelectorAll('.bars li').length,
          classes: c.className}));""")


def wait_for(driver, script: str, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(
        lambda d: d.execute_script(script), message=what)


def upload(driver, *paths) -> None:
    from selenium.webdriver.common.by import By

    before = len(cards_text(driver))
    driver.find_element(By.ID, "pick").send_keys("\n".join(str(p) for p in paths))
    wait_for(driver, f"""const c = document.querySelectorAll('#results .result');
        return c.length >= {before + len(paths)} &&
          [...c].every(x => x.querySelector('.cls').textContent !== '…');""",
             "results for the uploaded files")


def save_shot(driver, tmp_path, name: str):
    shot = tmp_path / name
    driver.save_screenshot(str(shot))
    if os.environ.get("IMGTRIAGE_SCREENSHOT_DIR"):
        shutil.copy(shot, os.path.join(os.environ["IMGTRIAGE_SCREENSHOT_DIR"], name))
    return np.asarray(Image.open(shot).convert("L"))


def test_page_classifies_an_uploaded_image(live_server, predictor, digit_pngs, tmp_path):
    name, data = digit_pngs[10]
    image = tmp_path / name
    image.write_bytes(data)
    (expected,) = predictor.predict_bytes([data], [name], include_probs=True)
    with headless_chromium() as driver:
        driver.get(live_server.url + "/")
        wait_for(driver, "return document.getElementById('status').textContent === 'ready'",
                 "the page to see the model ready")
        assert "crop_cnn" in driver.find_element("id", "model").text
        upload(driver, image)
        (card,) = cards_text(driver)
        assert card["name"] == name and card["cls"] == expected["class"]
        assert card["score"] == f"score {expected['score']:.3f}"
        assert card["bars"] == 10 and "abstained" not in card["classes"]
        assert console_errors(driver) == []
        pixels = save_shot(driver, tmp_path, "serve-page-result.png")
        assert pixels.std() > 10  # a rendered page, not a blank one

        driver.find_element("css selector", "#settings summary").click()
        driver.find_element("css selector", "#profile option[value=strict]").click()
        upload(driver, image)
        strict = cards_text(driver)[0]  # newest first
        assert strict["cls"] == "unknown" and "abstained" in strict["classes"]
        assert f"best guess {expected['class']}" in strict["note"]
        assert "not sure enough to decide" in strict["note"]  # the row's reason, in words

        junk = tmp_path / "notes.txt"
        junk.write_text("not an image")
        upload(driver, junk)
        bad = cards_text(driver)[0]
        assert bad["cls"] == "unsupported format" and "defect" in bad["classes"]
        assert "415" in driver.find_element("id", "error").text
        save_shot(driver, tmp_path, "serve-page-unknown-and-defect.png")
