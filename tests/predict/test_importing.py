"""imgtriage import: foreign models become bundles that answer exactly what the original does.

Each test builds the original model itself (random weights), computes its answers on tiny PNGs
with the original framework's own preprocessing written out independently, and compares."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from imgtriage.errors import ConfigError, ImportParityError
from imgtriage.predict import Predictor
from imgtriage.predict.importing import ImportConfig, import_model

pytest.importorskip("onnxruntime")
SIDE = 32
IMAGENET = (np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225],
                                                                    np.float32))
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Six RGB PNGs at the model's size (no resize: the reference needs none either)."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(6):
        base = rng.integers(0, 256, 3)
        arr = np.clip(base + rng.normal(0, 40, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / f"img{i}.png")
    return root


def _pixels(root) -> tuple[list[str], np.ndarray]:
    files = sorted(root.glob("*.png"))
    return [f.name for f in files], np.stack([np.asarray(Image.open(f).convert("RGB"),
                                                         np.float32) for f in files])


def _bundle_probs(bundle, root, **load) -> np.ndarray:
    rep = Predictor.load(bundle, **load).predict_paths([root], include_probs=True)
    rows = sorted(rep["results"], key=lambda r: r["path"])
    classes = rep["meta"]["classes"]
    return np.array([[r["probs"][c] for c in classes] for r in rows])


def _torch_probs(model, x_nchw: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return torch.softmax(model.eval()(torch.from_numpy(x_nchw)), 1).double().numpy()


def _imagenet_nchw(px: np.ndarray) -> np.ndarray:
    mean, std = IMAGENET
    return np.ascontiguousarray(((px / 255.0 - mean) / std).transpose(0, 3, 1, 2),
                                dtype=np.float32)


def test_torchvision_resnet18_state_dict(images, tmp_path):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    with torch.no_grad():
        model.fc.weight.mul_(30)  # spread the probabilities so a drift would show
    torch.save(model.state_dict(), tmp_path / "best_resnet.pth")
    _, px = _pixels(images)
    want = _torch_probs(model, _imagenet_nchw(px))
    assert want.max() - want.min() > 0.3
    np.save(tmp_path / "expected.npy", want)
    cfg = ImportConfig(classes=("cat", "dog", "owl"), arch="torchvision:resnet18", size=SIDE,
                       check_images=str(images), expected=str(tmp_path / "expected.npy"))
    res = import_model(tmp_path / "best_resnet.pth", tmp_path / "bundle", cfg)
    assert res.parity["max_abs_dprob"] <= 1e-4 and res.parity["n_images"] == 6
    for backend in ("torch", "onnx"):  # like a trained bundle, it carries a verified graph
        got = _bundle_probs(res.bundle_path, images, backend=backend)
        assert np.abs(got - want).max() <= 1e-4, backend
    pre = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["preprocess"]
    assert (pre["channel_order"], pre["value_range"], pre["mean"]) == (
        "rgb", 1.0, [0.485, 0.456, 0.406])
    # the same file declared with Keras preprocessing fails the parity check, leaving nothing
    bad = ImportConfig(classes=("cat", "dog", "owl"), arch="torchvision:resnet18", size=SIDE,
                       preprocess="keras-caffe", check_images=str(images),
                       expected=str(tmp_path / "expected.npy"))
    with pytest.raises(ImportParityError, match="--preprocess"):
        import_model(tmp_path / "best_resnet.pth", tmp_path / "wrong", bad)
    assert not (tmp_path / "wrong").exists()


def test_timm_checkpoint(images, tmp_path):
    import timm

    torch.manual_seed(1)
    model = timm.create_model("resnet10t", num_classes=4)
    with torch.no_grad():
        model.fc.weight.mul_(30)
    torch.save({"epoch": 7, "arch": "resnet10t", "state_dict": model.state_dict()},
               tmp_path / "checkpoint.pth")
    _, px = _pixels(images)
    x = np.ascontiguousarray(((px / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2), np.float32)
    want = _torch_probs(model, x)
    cfg = ImportConfig(classes=("a", "b", "c", "d"), arch="timm:resnet10t", size=SIDE,
                       preprocess="keras-tf")
    res = import_model(tmp_path / "checkpoint.pth", tmp_path / "bundle", cfg)
    assert np.abs(_bundle_probs(res.bundle_path, images) - want).max() <= 1e-4


class _KerasStyle(torch.nn.Module):
    """Takes NHWC, BGR, ImageNet-mean-subtracted 0..255 pixels; ends in a softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        z = torch.relu(self.conv(x.permute(0, 3, 1, 2) / 40.0)).mean(dim=(2, 3))
        return torch.softmax(self.fc(z) * 8, dim=1)


@pytest.fixture(scope="module")
def keras_onnx(tmp_path_factory):
    import io

    torch.manual_seed(2)
    buf = io.BytesIO()
    torch.onnx.export(_KerasStyle().eval(), (torch.zeros(1, SIDE, SIDE, 3),), buf,
                      dynamo=False, input_names=["input_1"], output_names=["predictions"],
                      dynamic_axes={"input_1": {0: "N"}, "predictions": {0: "N"}},
                      opset_version=17)
    path = tmp_path_factory.mktemp("onnx") / "keras_resnet.onnx"
    path.write_bytes(buf.getvalue())
    return path


def _keras_reference(path, px: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    x = np.ascontiguousarray(px[..., ::-1] - CAFFE_MEAN_BGR, np.float32)  # preprocess_input
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_1": x})[0].astype(np.float64)


def test_onnx_with_keras_caffe_preprocessing(images, keras_onnx, tmp_path):
    names, px = _pixels(images)
    want = _keras_reference(keras_onnx, px)
    assert want.max() - want.min() > 0.3
    (tmp_path / "expected.json").write_text(json.dumps(
        {n: row.tolist() for n, row in zip(names, want, strict=True)}))
    cfg = ImportConfig(classes=("animal", "avatar", "human"), preprocess="keras-caffe",
                       check_images=str(images), expected=str(tmp_path / "expected.json"))
    res = import_model(keras_onnx, tmp_path / "bundle", cfg)
    m = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert m["onnx"]["foreign"]["layout"] == "nhwc"
    assert m["onnx"]["foreign"]["outputs"] == "probabilities"
    assert m["preprocess"]["size"] == [SIDE, SIDE] and m["preprocess"]["channel_order"] == "bgr"
    assert m["preprocess"]["value_range"] == 255.0 and m["imported"]["parity"] is not None
    assert np.abs(_bundle_probs(res.bundle_path, images) - want).max() <= 1e-4
    with pytest.raises(ConfigError, match="no PyTorch weights"):
        Predictor.load(res.bundle_path, backend="torch")


def test_imported_bundle_calibrates_like_any_other(images, keras_onnx, tmp_path):
    from imgtriage.predict.assess import calibrate_bundle

    res = import_model(keras_onnx, tmp_path / "bundle", ImportConfig(
        classes=("animal", "avatar", "human"), preprocess="keras-caffe"))
    labelled = tmp_path / "val"
    for i, f in enumerate(sorted(images.glob("*.png"))):
        (labelled / ("animal", "avatar", "human")[i % 3]).mkdir(parents=True, exist_ok=True)
        (labelled / ("animal", "avatar", "human")[i % 3] / f.name).write_bytes(f.read_bytes())
    calibrate_bundle(res.bundle_path, labelled, thresholds="0.9", abstain=True)
    rows = Predictor.load(res.bundle_path).predict_paths([images])["results"]
    assert all(r["class_id"] == -1 for r in rows if r["abstained"]) and len(rows) == 6


def test_imported_graph_is_a_cascade_second_stage(keras_onnx, tmp_path):
    from imgtriage.predict.cascade import CascadeConfig, build_cascade

    classes = ("animal", "avatar", "human")
    rng = np.random.default_rng(1)
    for k, c in enumerate(classes):  # a colour per class: the statistics can tell them apart
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(5):
            arr = np.clip(rng.normal(60 + 70 * k, 20, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "data" / c / f"{i}.png")
    res = import_model(keras_onnx, tmp_path / "bundle", ImportConfig(classes=classes,
                                                                     preprocess="keras-caffe"))
    cas = build_cascade(res.bundle_path, tmp_path / "data", tmp_path / "cascade",
                        CascadeConfig(route_share=0.5))
    rows = Predictor.load(cas.bundle_path).predict_paths([tmp_path / "data"])["results"]
    assert len(rows) == 15 and {r["stage"] for r in rows} <= {1, 2}


def test_wrong_preprocessing_name_and_class_count_are_refused(keras_onnx, tmp_path):
    import torchvision

    with pytest.raises(ConfigError, match="keras-caffe, keras-tf, torch-imagenet"):
        ImportConfig(classes=("a", "b", "c"), preprocess="keras_cafe")
    with pytest.raises(ConfigError, match="3 outputs but 2 class names"):
        import_model(keras_onnx, tmp_path / "b1", ImportConfig(classes=("a", "b"),
                                                               preprocess="keras-caffe"))
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), tmp_path / "r.pth")
    with pytest.raises(ConfigError, match="5 outputs but 3 class names"):
        import_model(tmp_path / "r.pth", tmp_path / "b2", ImportConfig(
            classes=("a", "b", "c"), arch="torchvision:resnet18"))
    with pytest.raises(ConfigError, match="--arch"):
        import_model(tmp_path / "r.pth", tmp_path / "b3", ImportConfig(classes=("a", "b")))
    assert not any((tmp_path / b).exists() for b in ("b1", "b2", "b3"))


def test_cli_import(keras_onnx, images, tmp_path):
    from imgtriage.cli.main import app

    (tmp_path / "labels.txt").write_text("animal\navatar\nhuman\n")
    res = CliRunner().invoke(app, ["import", str(keras_onnx), "--out", str(tmp_path / "b"),
                                   "--classes", str(tmp_path / "labels.txt"),
                                   "--preprocess", "keras-caffe"])
    assert res.exit_code == 0, res.output
    assert "keras-caffe" in res.output and "onnx" in res.output
    assert Predictor.load(tmp_path / "b").classes == ["animal", "avatar", "human"]
    res = CliRunner().invoke(app, ["import", str(keras_onnx), "--out", str(tmp_path / "c"),
                                   "--classes", "a,b,c", "--preprocess", "custom"])
    assert res.exit_code != 0 and "--mean" in str(res.exception)
