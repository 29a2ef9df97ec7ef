"""The backbone: a timm ViT (ViT-B/16, DINOv2, CLIP, MAE …) or Swin, built with
``timm.create_model`` and loaded through timm's own weight loading (HF hub when online, or a local
.safetensors / .pth / .npz file).

Family-specific needs handled here: the classifier is whatever ``get_classifier()`` returns (ViT
``head``, Swin ``head.fc``); ``img_size`` must tile into whole patches (ViT) or whole attention
windows at every stage (Swin), else a clear error; and a checkpoint whose pooling head differs
from the requested one (MAE's fine-tuning head: average pooling and a fresh ``fc_norm`` instead of
the pretrained final ``norm``) is loaded into the requested architecture by name.

The model's layout, which methods place themselves by: :func:`backbone_family`, the transformer
blocks in forward order (:data:`BLOCK_NAME`, :func:`block_names`) and the block a module sits in
(:func:`layer_index`)."""
from __future__ import annotations

import fnmatch
import os
import re
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional
from urllib.parse import urlparse

import timm
import torch.nn as nn

from .errors import ConfigValueError, PeftVitError, WeightsFileError, WeightsNotFoundError

HOW_TO_PASS_A_FILE = (
    "pass a local weight file with model.checkpoint=/path/to/weights "
    "(.safetensors, .pth or .npz, e.g. Google's ViT-B_16.npz for orig_in21k), "
    "or train from random initialisation with model.pretrained=false"
)


class PretrainedWeightsUnavailable(PeftVitError, RuntimeError):
    """No pretrained weights can be had (offline, not cached, no file given)."""


def _hub_file(name: str):
    """(repo_id, filename) timm would download for ``name``, or None."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - an unknown name is reported by timm.create_model itself
        return None
    if cfg is None or not getattr(cfg, "hf_hub_id", None):
        return None
    return cfg.hf_hub_id, getattr(cfg, "hf_hub_filename", None) or "model.safetensors"


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _pretrained_source(name: str) -> Optional[Dict[str, Any]]:
    """Decide where pretrained weights come from, failing in seconds when nothing can work.

    Returns a ``pretrained_cfg_overlay`` (a cached file) or None (let timm use the hub).
    """
    hub = _hub_file(name)
    if hub is None or _hub_reachable():
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(*hub)
    if isinstance(cached, str) and os.path.exists(cached):
        return dict(file=cached)
    raise PretrainedWeightsUnavailable(
        f"pretrained weights for {name!r} are not in the local Hugging Face cache and the hub "
        f"({hub[0]}) cannot be reached; {HOW_TO_PASS_A_FILE}")


def checkpoint_overlay(path: str) -> Dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsNotFoundError(f"model.checkpoint file not found: {p} ({HOW_TO_PASS_A_FILE})")
    suffix = p.suffix.lower()
    if suffix not in (".safetensors", ".pth", ".pt", ".bin", ".npz"):
        raise ConfigValueError(f"model.checkpoint {p}: unsupported format {suffix!r}; use .safetensors, .pth or .npz")
    overlay: Dict[str, Any] = dict(file=str(p.resolve()))
    if suffix == ".npz":  # Google's original JAX checkpoints: the ViT's own npz loader
        overlay["custom_load"] = True
    return overlay


def create_backbone(
    name: str,
    num_classes: int,
    pretrained: bool = True,
    checkpoint: Optional[str] = None,
    drop_path_rate: float = 0.0,
    img_size: int = 224,
    overrides: Optional[Dict[str, Any]] = None,
    zero_head: bool = False,
) -> nn.Module:
    """A timm ViT or Swin with a fresh ``Linear(width, num_classes)`` classifier
    (``get_classifier()``: ViT ``head``, Swin ``head.fc``; timm's init: weight
    trunc-normal(0.02), bias 0; with ``zero_head`` weight and bias 0, as RLRR's official script).

    ``overrides`` go to ``timm.create_model`` (``patch_size``, ``depth``, ``embed_dim``,
    ``num_heads`` … for tiny test models).
    """
    overrides = dict(overrides or {})
    if overrides.get("fc_norm") and (pretrained or checkpoint):  # MAE's fine-tuning head
        model = _with_fresh_fc_norm(name, num_classes, checkpoint, drop_path_rate, img_size, overrides)
    else:
        model = _create(name, num_classes, pretrained, checkpoint, drop_path_rate, img_size, overrides)
    check_img_size(model, name, img_size)
    if zero_head:
        head = model.get_classifier()
        nn.init.zeros_(head.weight)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
    return model


def _weights(name: str, checkpoint: Optional[str]) -> Optional[Dict[str, Any]]:
    """The ``pretrained_cfg_overlay`` of the weights to load: a local file, a cached hub file, or
    None (timm downloads from the hub)."""
    return checkpoint_overlay(checkpoint) if checkpoint else _pretrained_source(name)


def weights_problem(name: str, pretrained: bool = True, checkpoint: Optional[str] = None, **_) -> Optional[str]:
    """Why the weights a model config asks for cannot be had (the error's message), or None; in
    seconds, without building the model (the loop asks when the data is missing too, to name both)."""
    if not (pretrained or checkpoint):
        return None
    try:
        _weights(name, checkpoint)
    except (PretrainedWeightsUnavailable, WeightsFileError) as e:
        return str(e)
    return None


WORKING_FORMATS = (".safetensors (safetensors), .pth / .pt / .bin (torch.save of a state dict), "
                   ".npz (Google's JAX ViT checkpoints, e.g. ViT-B_16.npz)")


def detect_format(path: Path) -> str:
    """What a weights file is by its first bytes, whatever its suffix."""
    import json
    import struct
    import zipfile

    with open(path, "rb") as f:
        head = f.read(16)
    size = os.path.getsize(path)
    if not head:
        return "an empty file"
    if head.startswith(b"PK"):
        try:
            names = zipfile.ZipFile(path).namelist()
        except zipfile.BadZipFile:
            return "a damaged zip archive"
        if any(n.endswith("data.pkl") for n in names):
            return "a torch.save zip archive"
        if names and all(n.endswith(".npy") for n in names):
            return "a numpy .npz archive"
        return f"a zip archive of {len(names)} files, not weights"
    if head[:1] == b"\x80":
        return "a pickle (legacy torch.save)"
    if len(head) >= 9:
        n = struct.unpack("<Q", head[:8])[0]
        if head[8:9] == b"{" and n <= size - 8:
            try:
                with open(path, "rb") as f:
                    f.seek(8)
                    json.loads(f.read(n))
                return "a safetensors file"
            except ValueError:
                return "a damaged safetensors file (its header is not JSON)"
    if head.lstrip()[:1] in (b"<", b"{") or all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "a text file (an HTML page or an error message saved in its place?)"
    return "not a format this project reads"


@contextmanager
def _hub_errors(name: str, checkpoint: Optional[str]):
    """A failed hub download becomes PretrainedWeightsUnavailable, naming the fix; a local
    ``checkpoint`` that cannot be loaded is a :class:`WeightsFileError` naming its path, its format
    as detected and the formats that work."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - safetensors, torch.load and numpy each raise their own kinds
        if checkpoint:
            p = Path(checkpoint).expanduser()
            raise WeightsFileError(f"model.checkpoint {p} cannot be loaded ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''}); the file is {detect_format(p)}. "
                                   f"Formats that work: {WORKING_FORMATS}") from e
        if not isinstance(e, (OSError, RuntimeError, ValueError)) or \
                not any(w in str(e).lower() for w in ("offline", "connection", "hub")):
            raise
        raise PretrainedWeightsUnavailable(f"could not load pretrained weights for {name!r} "
                                           f"({type(e).__name__}: {e}); {HOW_TO_PASS_A_FILE}") from e


def _create(name, num_classes, pretrained, checkpoint, drop_path_rate, img_size, overrides) -> nn.Module:
    kwargs: Dict[str, Any] = dict(num_classes=num_classes, drop_path_rate=drop_path_rate,
                                  img_size=img_size, **dict(overrides or {}))
    if not (pretrained or checkpoint):
        return timm.create_model(name, pretrained=False, **kwargs)
    overlay = _weights(name, checkpoint)
    with _hub_errors(name, checkpoint):
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


def _with_fresh_fc_norm(name, num_classes, checkpoint, drop_path_rate, img_size, overrides) -> nn.Module:
    """MAE's fine-tuning head (``global_pool: avg, fc_norm: true``): the patch tokens are averaged
    and normalised by a new LayerNorm, and the pretrained final ``norm`` is dropped (MAE's
    ``models_vit.py``; VPT's MAE backbone does the same). MAE's checkpoint holds ``norm`` and no
    ``fc_norm``: the requested model is built once and the checkpoint read once by timm's
    ``load_pretrained``, non-strict, and the load must then have left out only ``fc_norm.*`` (timm's
    init: weight 1, bias 0) and the head, and found nothing but ``norm.*`` unused (a file that has
    ``fc_norm``, as scripts/export_merged.py writes, loads whole)."""
    from timm.models import load_pretrained
    from timm.models.vision_transformer import checkpoint_filter_fn

    model = timm.create_model(name, pretrained=False, pretrained_cfg_overlay=_weights(name, checkpoint),
                              num_classes=num_classes, drop_path_rate=drop_path_rate, img_size=img_size, **overrides)
    loads: list = []
    hook = model.register_load_state_dict_post_hook(lambda module, keys: loads.append(keys))
    with _hub_errors(name, checkpoint):
        load_pretrained(model, num_classes=num_classes, filter_fn=checkpoint_filter_fn, strict=False)
    hook.remove()
    if len(loads) != 1:  # e.g. an .npz, which timm loads with its own loader, not by tensor name
        raise RuntimeError(f"{name}: model.overrides.fc_norm=true needs a checkpoint loaded by tensor name "
                           f"(.safetensors or .pth), not {model.pretrained_cfg.get('file') or 'this one'}")
    odd = [k for k in loads[0].missing_keys if not k.startswith(("fc_norm.", "head."))]
    odd += [k for k in loads[0].unexpected_keys if not k.startswith("norm.")]
    if odd:
        raise RuntimeError(f"{name}: model.overrides.fc_norm=true expects a checkpoint that differs only in its "
                           f"final norm; these tensors do not match: {odd[:5]}")
    return model


def check_img_size(model: nn.Module, name: str, img_size: int) -> None:
    """``img_size`` must be a whole number of patches (ViT) and, for Swin, give every stage a
    whole number of attention windows: a multiple of patch · 2^(stages-1) · window (224 for
    Swin-B/4 window 7). Otherwise timm pads the feature maps, which the pretrained weights never saw."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        return
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    layers = getattr(model, "layers", None)
    if type(model).__name__ == "SwinTransformer" and layers is not None:
        window = layers[0].blocks[0].window_size
        window = window[0] if isinstance(window, (tuple, list)) else window
        step = patch * 2 ** (len(layers) - 1) * window
        if img_size % step:
            raise ValueError(
                f"model.img_size={img_size} does not fit {name}: a Swin with patch {patch}, {len(layers)} stages "
                f"and window {window} needs a multiple of {patch}·{2 ** (len(layers) - 1)}·{window} = {step} so "
                f"that every stage tiles into whole windows (e.g. model.img_size={max(step, img_size // step * step)})")
    elif img_size % patch:
        raise ValueError(f"model.img_size={img_size} is not a multiple of the patch size {patch} of {name} "
                         f"(e.g. model.img_size={max(patch, img_size // patch * patch)})")


# --------------------------------------------------------------------------- layout

# The transformer blocks of the timm families this project supports, in forward order: ViT and its
# relatives (DINOv2, CLIP, MAE) ``blocks.N``; Swin ``layers.S.blocks.N`` (hierarchical: the width
# grows by stage). A method locates its sites relative to these names (``<block>.attn.qkv``).
BLOCK_NAME = re.compile(r"(?:layers\.\d+\.)?blocks\.\d+")


def backbone_family(model: nn.Module) -> str:
    """``vit`` or ``swin`` (timm's ``VisionTransformer`` / ``SwinTransformer``), else the class name."""
    kind = type(model).__name__
    return {"VisionTransformer": "vit", "SwinTransformer": "swin"}.get(kind, kind)


def block_names(model: nn.Module, pattern: Optional[str] = None) -> List[str]:
    """The names of the model's transformer blocks, in forward order (:data:`BLOCK_NAME`), or those
    matching the fnmatch ``pattern`` (a method's ``blocks`` option) when one is given."""
    if pattern is None:
        names = [n for n, _ in model.named_modules() if BLOCK_NAME.fullmatch(n)]
    else:
        names = [n for n, _ in model.named_modules() if fnmatch.fnmatch(n, pattern) and n.count(".") == pattern.count(".")]
    if not names:
        want = repr(pattern) if pattern else "blocks.N or layers.S.blocks.N"
        raise ValueError(f"{type(model).__name__}: no transformer block matches {want}; pass the blocks' "
                         "module names as a pattern (a method's `blocks` option, e.g. method.blocks='blocks.*')")
    return names


def layer_index(model: nn.Module, pattern: Optional[str] = None) -> Callable[[str], int]:
    """``index(module_name)``: the position of the block holding that module among
    :func:`block_names` (one count across Swin's stages), -1 outside every block."""
    where = {b: i for i, b in enumerate(block_names(model, pattern))}

    def index(name: str) -> int:
        parts = name.split(".")
        for k in range(len(parts), 0, -1):
            i = where.get(".".join(parts[:k]))
            if i is not None:
                return i
        return -1
    return index
