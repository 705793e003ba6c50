"""Reading a pretrained weights file safely and loading it strictly into a model.

Every pretrained file goes through :func:`read_state_dict` (plain tensors only: a pickle that
would run code is refused) and :func:`load_strict` (every key and shape is checked; only the
classifier head may differ, and a first conv with another channel count is adapted), so a file
whose key names do not match the architecture can never leave the model silently at random.

Example:
    >>> import timm
    >>> m = timm.create_model("resnet18", num_classes=3)
    >>> sd = timm.create_model("resnet18", num_classes=1000).state_dict()
    >>> load_strict(m, sd, head=("fc",), first_conv="conv1", source="r18").head_reset
    True
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from imgtriage.errors import UnsafeWeightsError, WeightsMismatchError, WeightsUnavailableError

StateDict = dict[str, torch.Tensor]
_SHOWN = 5  # keys listed per kind of mismatch
_WRAPPERS = ("state_dict", "model", "model_state_dict", "module")


def read_state_dict(path: str | os.PathLike[str]) -> StateDict:
    """A ``.safetensors`` file or a ``.pth/.pt/.bin`` state dict -> {name: tensor}.

    ``.pth`` files load with ``torch.load(weights_only=True)``: a pickle that needs code to
    load raises UnsafeWeightsError. A checkpoint dict wrapping the weights under
    ``state_dict``/``model`` is unwrapped; a ``module.`` prefix (DataParallel) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"pretrained weights file {path} does not exist; pass an "
                                      "existing .safetensors/.pth file to --pretrained")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeWeightsError(
            f"{path} is a pickle that needs code to load ({str(exc).splitlines()[0][:160]}); "
            "imgtriage only loads plain tensors. Re-save it where you trust it as "
            "`torch.save(model.state_dict(), 'w.pth')` or as .safetensors") from exc
    except Exception as exc:  # corrupt or foreign file: say which and what is accepted
        raise WeightsUnavailableError(
            f"could not read weights file {path}: {type(exc).__name__}: {exc}; pass a "
            ".safetensors file or a .pth state dict saved with torch.save") from exc
    return _unwrap(obj, path)


def _unwrap(obj: object, path: Path) -> StateDict:
    while isinstance(obj, dict) and any(k in obj for k in _WRAPPERS) and not all(
            isinstance(v, torch.Tensor) for v in obj.values()):
        obj = next(obj[k] for k in _WRAPPERS if k in obj)
    if not isinstance(obj, dict) or not obj:
        raise WeightsMismatchError(f"{path} holds {type(obj).__name__}, not a state dict of "
                                   "named tensors; save `model.state_dict()`")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsMismatchError(f"{path}: entries {bad[:_SHOWN]} are not tensors; save "
                                   "`model.state_dict()` only")
    if all(k.startswith("module.") for k in obj):
        obj = {k[7:]: v for k, v in obj.items()}
    return dict(obj)


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_strict` did: tensors loaded, head re-initialised, first conv adapted."""

    loaded: int
    head_reset: bool
    adapted_first_conv: bool


def _is_head(key: str, head: Sequence[str]) -> bool:
    return any(key == h or key.startswith(h + ".") for h in head)


def _adapt_first_conv(state: StateDict, own: StateDict, first_conv: str | None) -> bool:
    key = f"{first_conv}.weight" if first_conv else None
    if key is None or key not in state or key not in own:
        return False
    w, target = state[key], own[key]
    if w.ndim != 4 or w.shape == target.shape or w.shape[0] != target.shape[0] \
            or w.shape[2:] != target.shape[2:]:
        return False
    from timm.models import adapt_input_conv

    state[key] = adapt_input_conv(int(target.shape[1]), w, base_chans=int(w.shape[1]))
    return True


def _mismatch(model_name: str, source: str, missing: list[str], unexpected: list[str],
              shapes: list[str]) -> WeightsMismatchError:
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected),
                       ("wrong shape", shapes)):
        if keys:
            more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
            parts.append(f"{len(keys)} {what}: {', '.join(keys[:_SHOWN])}{more}")
    return WeightsMismatchError(
        f"weights {source} do not fit {model_name}: {'; '.join(parts)}. Only the classifier "
        "head may differ. Pass weights saved from this architecture (or a registered "
        "package, `imgtriage weights`), convert the key names, or train from scratch with "
        "--pretrained none")


def load_strict(model: nn.Module, state: StateDict, *, head: Sequence[str],
                first_conv: str | None, source: str, model_name: str | None = None
                ) -> LoadReport:
    """Load ``state`` into ``model`` checking every key and shape.

    Keys under the ``head`` prefixes may be absent or differently shaped (they stay at their
    fresh initialisation); a first conv made for another channel count is adapted with
    timm's rule; a file without BatchNorm ``num_batches_tracked`` counters is fine. Anything
    else raises WeightsMismatchError listing the first keys of each kind.
    """
    own = model.state_dict()
    state = dict(state)
    adapted = _adapt_first_conv(state, own, first_conv)
    missing = [k for k in own if k not in state and not _is_head(k, head)
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not _is_head(k, head)]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and not _is_head(k, head) and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise _mismatch(model_name or type(model).__name__, source, missing, unexpected, shapes)
    keep = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    head_reset = any(_is_head(k, head) and k not in keep for k in own)
    model.load_state_dict(keep, strict=False)
    return LoadReport(len(keep), head_reset, adapted)


# --- key mappings: another library's names -> timm's -------------------------------------

_STEM = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
         "_fc": "classifier"}
_EXPAND_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                 "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
             "_bn2": "bn2"}


def _block_names(model: nn.Module) -> list[str]:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise WeightsMismatchError(f"{type(model).__name__} has no EfficientNet blocks; the "
                                   "lukemelas efficientnet_pytorch mapping does not apply")
    return [f"blocks.{s}.{i}" for s, stage in enumerate(blocks) for i in range(len(stage))]


def map_lukemelas_efficientnet(state: StateDict, model: nn.Module) -> StateDict:
    """lukemelas ``efficientnet_pytorch`` key names (``_blocks.N._expand_conv``) -> timm's
    EfficientNet (``blocks.s.i.conv_pw``); timm-style files pass unchanged.

    Blocks are matched in order (``_blocks.N`` is the N-th block of timm's stages); a block
    with an ``_expand_conv`` is an inverted residual, one without is timm's depthwise-separable
    block (its ``_bn1``/``_bn2`` become ``bn1``/``bn2``).
    """
    if not any(k.startswith("_conv_stem") for k in state):
        return dict(state)
    names = _block_names(model)
    n_file = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("_blocks.")),
                     default=-1)
    if n_file != len(names):
        raise WeightsMismatchError(f"the file has {n_file} blocks but {type(model).__name__} "
                                   f"has {len(names)}: it is for another variant")
    expand = {int(k.split(".")[1]) for k in state if "._expand_conv." in k}
    out: StateDict = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n, layer = int(parts[1]), parts[2]
            table = _EXPAND_BLOCK if n in expand else _DS_BLOCK
            new = f"{names[n]}.{table.get(layer, layer)}.{'.'.join(parts[3:])}"
        else:
            new = ".".join([_STEM.get(parts[0], parts[0]), *parts[1:]])
        out[new] = value
    return out


MAPPINGS: dict[str, Callable[[StateDict, nn.Module], StateDict]] = {
    "timm": lambda state, model: dict(state),
    "lukemelas_efficientnet": map_lukemelas_efficientnet,
}
