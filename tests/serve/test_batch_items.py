"""A JSON batch answers per item: one bad base64 item or one bad file never costs the other
images of the request their answers, and a bad file gets the reason the CLI's defect log
gives for the same bytes."""

from __future__ import annotations

import base64
import json

from serve_helpers import assert_problem, still_serving
from typer.testing import CliRunner

from imgtriage.cli.main import app


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_bad_base64_items_are_answered_in_place(client, predictor, digit_pngs):
    (n0, good0), (n1, good1) = digit_pngs[0], digit_pngs[4]
    doc = {"images": [_b64(good0), "not base64!", _b64(good1), "data:image/png,AAAA"],
           "names": [n0, "broken.png", n1, "dataurl.png"]}
    r = client.post("/v1/classify?include_probs=true", json=doc)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["num_results"] == 2 and body["num_defects"] == 2
    rows = body["results"]
    assert [rows[0], rows[2]] == predictor.predict_bytes([good0, good1], [n0, n1],
                                                         include_probs=True)
    assert rows[1]["path"] == "broken.png" and rows[3]["path"] == "dataurl.png"
    assert {rows[1]["issue"], rows[3]["issue"]} == {"bad_base64"}
    assert set(rows[1]) == {"path", "issue", "message"}
    assert "images[1] is not valid base64" in rows[1]["message"]
    assert "images[3]" in rows[3]["message"] and ";base64," in rows[3]["message"]


def test_unnamed_bad_item_is_named_by_its_index(client, digit_pngs):
    r = client.post("/v1/classify", json={"images": ["%%%", _b64(digit_pngs[0][1])]})
    assert r.status_code == 200, r.text
    bad, good = r.json()["results"]
    assert bad["path"] == "image[0]" and bad["issue"] == "bad_base64" and "class" in good


def test_every_item_bad_base64_is_still_a_400_with_the_defects(client, digit_pngs):
    body = assert_problem(client.post("/v1/classify", json={"images": ["!!", "??"]}),
                          400, "bad-base64")
    assert [d["path"] for d in body["defects"]] == ["image[0]", "image[1]"]
    assert "images[0]" in body["detail"]
    mixed = client.post("/v1/classify", json={"images": ["!!", _b64(b"plain text")]})
    body = assert_problem(mixed, 422, "unusable-images")
    assert [d["issue"] for d in body["defects"]] == ["bad_base64", "unsupported_format"]
    still_serving(client, digit_pngs[0][1])


def test_same_bytes_same_reason_in_the_cli_defect_log_and_the_api(client, profiled_bundle,
                                                                  digit_pngs, tmp_path):
    png = digit_pngs[0][1]
    bad = {"notes.txt": b"hello, notes", "cut.png": png[:60], "empty.png": b"",
           "text.png": b"not a png at all"}
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name, data in bad.items():
        (inbox / name).write_bytes(data)
    (inbox / "ok.png").write_bytes(png)
    log = tmp_path / "defects.json"
    res = CliRunner().invoke(app, ["predict", str(profiled_bundle), str(inbox), "--output",
                                   str(tmp_path / "r.json"), "--defect-log", str(log),
                                   "--backend", "torch", "--no-progress"])
    assert res.exit_code == 0, res.output
    cli = {p["path"].rsplit("/", 1)[-1]: p for p in json.loads(log.read_text())}
    assert set(cli) == set(bad)
    names = [*bad, "ok.png"]
    doc = {"images": [_b64(bad.get(n, png)) for n in names], "names": names}
    rows = client.post("/v1/classify", json=doc).json()["results"]
    assert "class" in rows[-1]
    for name, row in zip(names, rows[:-1], strict=False):
        full = str(inbox / name)
        assert (row["issue"], row["message"]) == (
            cli[name]["issue"], cli[name]["message"].replace(full, name)), name
