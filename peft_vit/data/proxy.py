"""The proxy benchmark's data: procedurally generated 32-px images, deterministic from a seed.

* :func:`pretrain_batch` - the pretraining set of ``scripts/proxy_pretrain.py``: 32 classes =
  8 shapes x 4 textures, with hue, position, scale, rotation, count (1-2 copies) and background
  as nuisances (never labels). Hue is a nuisance so that shape, not colour, decides the label.
* :data:`TASKS` - eight transfer tasks in VTAB-1k's spirit, written to disk in NOAH's layout
  (``<root>/<task>/{train800,val200,train800val200,test}.txt`` + ``images/<split>/*.png``) on
  first use and then read like any VTAB-1k folder (source ``proxy``). Their labels are none of
  the pretraining labels: a new shape (the arrow), new textures, sklearn's digits, noise
  spectra, and the nuisances themselves (count, position, orientation, distance).

    python -m peft_vit.data.proxy datasets/proxy      # write every task (done lazily otherwise)
"""
from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F

from . import DataSplits, PROTOCOLS, register_benchmark, register_source

IMG = 32
VERSION = 4  # of the layout and the shared rendering; a generator of one task: its ProxyTask.version
SIZES = {"train800": 800, "val200": 200, "test": 1000}

# ----------------------------------------------------------------------------- rendering

_T = (torch.arange(IMG, dtype=torch.float32) + 0.5) / IMG * 2 - 1  # pixel centres in [-1, 1]
GY, GX = torch.meshgrid(_T, _T, indexing="ij")  # (H, W); y grows downwards


def _u(g: torch.Generator, n: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def _sdf_circle(px, py):
    return px.hypot(py) - 0.9


def _sdf_square(px, py):
    return torch.maximum(px.abs(), py.abs()) - 0.75


def _sdf_triangle(px, py):  # equilateral, apex up
    return torch.maximum(0.866 * px.abs() - 0.5 * (py + 0.9), py - 0.55)


def _sdf_plus(px, py):
    a, b = px.abs(), py.abs()
    return torch.minimum(torch.maximum(a - 0.28, b - 0.9), torch.maximum(b - 0.28, a - 0.9))


def _sdf_ring(px, py):
    return (px.hypot(py) - 0.65).abs() - 0.25


def _sdf_diamond(px, py):
    return (px.abs() + py.abs() - 1.0) * 0.7071


def _sdf_halfdisk(px, py):
    return torch.maximum(px.hypot(py) - 0.95, -py - 0.25)


def _sdf_ellipse(px, py):
    return (px.hypot(py / 0.35) - 1.0) * 0.35


def _sdf_arrow(px, py):  # tall isosceles triangle, apex up: orientation is unique over 360 degrees
    return torch.maximum(0.949 * px.abs() - 0.316 * (py + 1.0), py - 0.8)


SHAPES = (_sdf_circle, _sdf_square, _sdf_triangle, _sdf_plus, _sdf_ring, _sdf_diamond, _sdf_halfdisk,
          _sdf_ellipse, _sdf_arrow)
PRETRAIN_SHAPES = 8  # the arrow (index 8) is never seen in pretraining
ARROW = 8
N_HUES, N_TEXTURES = 8, 4


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(N,) each in [0, 1] -> (N, 3)."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + h[:, None] * 6) % 6
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def palette(g: torch.Generator, hue: torch.Tensor) -> torch.Tensor:
    """A colour of hue class ``hue`` (0..7) with jittered hue, saturation and value."""
    n = len(hue)
    h = (hue.float() + _u(g, n, -0.2, 0.2)) / N_HUES % 1.0
    return hsv_to_rgb(h, _u(g, n, 0.6, 1.0), _u(g, n, 0.65, 1.0))


def background(g: torch.Generator, n: int, contrast: float = 0.25) -> torch.Tensor:
    """A smooth, low-saturation random field around a random grey level: (N, 3, H, W)."""
    grey = _u(g, n, 0.15, 0.85).view(n, 1, 1, 1)
    field = (torch.rand(n, 3, 4, 4, generator=g) - 0.5) * contrast
    field = field.mean(1, keepdim=True) * 0.6 + field * 0.4  # mostly luminance
    field = F.interpolate(field, size=(IMG, IMG), mode="bicubic", align_corners=False)
    return (grey + field).clamp(0, 1)


def texture(kind: torch.Tensor, px: torch.Tensor, py: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    """Object textures in the object's own frame, values in {0, 1}: 0 solid, 1 stripes,
    2 checker, 3 dots. ``kind``, ``freq``: (N,); ``px``, ``py``: (N, H, W)."""
    sx, sy = torch.sin(px * freq.view(-1, 1, 1)), torch.sin(py * freq.view(-1, 1, 1))
    k = kind.view(-1, 1, 1)
    return torch.where(k == 0, 1.0, torch.where(k == 1, sx > 0, torch.where(k == 2, sx * sy > 0, (sx > 0.3) & (sy > 0.3))).float())


def draw(canvas: torch.Tensor, shape: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, scale: torch.Tensor,
         angle: torch.Tensor, colour: torch.Tensor, tex: torch.Tensor, freq: torch.Tensor,
         visible: torch.Tensor = None) -> torch.Tensor:
    """Composite one object per image onto ``canvas`` (N, 3, H, W), anti-aliased over a pixel.
    ``scale`` is the object's radius in [-1, 1] units; a textured object is ``colour`` on a
    darker ``0.35 * colour``. ``visible`` (N,) bool: images that get no object."""
    dx, dy = GX - cx.view(-1, 1, 1), GY - cy.view(-1, 1, 1)
    c, s = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    sc = scale.view(-1, 1, 1)
    px, py = (c * dx + s * dy) / sc, (-s * dx + c * dy) / sc
    sdf = torch.empty_like(px)
    for k in shape.unique().tolist():  # each shape's distance only where it is drawn
        m = shape == k
        sdf[m] = SHAPES[k](px[m], py[m])
    alpha = (0.5 - sdf * sc * (IMG / 2)).clamp(0, 1)  # signed distance in pixels -> coverage
    if visible is not None:
        alpha = alpha * visible.view(-1, 1, 1).float()
    pattern = texture(tex, px, py, freq)
    fill = colour.view(-1, 3, 1, 1) * (0.35 + 0.65 * pattern[:, None])
    a = alpha[:, None]
    return canvas * (1 - a) + fill * a


def random_objects(g: torch.Generator, n: int, shapes: int = PRETRAIN_SHAPES) -> Dict[str, torch.Tensor]:
    """Random attributes for one object in each of ``n`` images."""
    return dict(shape=torch.randint(0, shapes, (n,), generator=g), colour=palette(g, torch.randint(0, N_HUES, (n,), generator=g)),
                tex=torch.randint(0, N_TEXTURES, (n,), generator=g), freq=_u(g, n, 3.5, 6.0),
                angle=_u(g, n, 0, 2 * math.pi), scale=_u(g, n, 0.2, 0.35))


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


# ----------------------------------------------------------------------------- pretraining

@dataclass(frozen=True)
class PretrainStage:
    """One stage of the shipped pretraining (scripts/proxy_pretrain.py runs them in order)."""
    hue_in_label: bool  # labels shape x hue x texture (256) instead of shape x texture (32)
    position: float  # object centres uniform in [-position, position] (units of half the image)
    radius: Tuple[float, float]  # object radius range, same units


PRETRAIN_STAGES = {
    # stage 1 (generator version 2): with hue in the label the backbone learnt colour and almost no
    # shape (held-out shape accuracy 21 %, chance 12.5 %) and transferred nothing to digits, so
    "hue": PretrainStage(True, 0.6, (0.22, 0.45)),
    # stage 2 continues from it with hue a nuisance: shape, not colour, decides the label
    "shape": PretrainStage(False, 0.5, (0.3, 0.6)),
}
NUM_PRETRAIN_CLASSES = PRETRAIN_SHAPES * N_TEXTURES  # 32 (the shipped head's, stage "shape")


def pretrain_classes(stage: str = "shape") -> int:
    return PRETRAIN_SHAPES * N_TEXTURES * (N_HUES if PRETRAIN_STAGES[stage].hue_in_label else 1)


def pretrain_batch(g: torch.Generator, n: int, stage: str = "shape") -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` pretraining images (uint8 (N, 3, 32, 32)) and labels (shape * 4 + texture, or
    shape * 32 + hue * 4 + texture for stage ``hue``). Each image holds 1-2 copies of its class's
    object (same shape, hue, texture), each at its own position, scale (stage ``shape``: radius
    5-10 px) and rotation, on a random background."""
    st = PRETRAIN_STAGES[stage]
    shape = torch.randint(0, PRETRAIN_SHAPES, (n,), generator=g)
    hue = torch.randint(0, N_HUES, (n,), generator=g)
    tex = torch.randint(0, N_TEXTURES, (n,), generator=g)
    count = torch.randint(1, 3, (n,), generator=g)
    img = background(g, n)
    colour = palette(g, hue)
    for k in range(2):
        img = draw(img, shape, _u(g, n, -st.position, st.position), _u(g, n, -st.position, st.position),
                   _u(g, n, *st.radius), _u(g, n, 0, 2 * math.pi), colour, tex, _u(g, n, 3.5, 6.0), visible=count > k)
    label = shape * (N_HUES * N_TEXTURES) + hue * N_TEXTURES + tex if st.hue_in_label else shape * N_TEXTURES + tex
    return to_uint8(img), label


# ----------------------------------------------------------------------------- transfer tasks

def gen_digits(g: torch.Generator, n: int, split: str):
    """scikit-learn's 8x8 digits, drawn in a random colour at a random scale (24-32 px), offset
    and tilt (+-6 degrees) on a random background. train800/val200 use the first 1,000 of a
    fixed permutation of the 1,797 originals, test the other 797 (each drawn once or twice)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = torch.randperm(len(d.target), generator=torch.Generator().manual_seed(0))
    pool = {"train800": perm[:800], "val200": perm[800:1000], "test": perm[1000:]}[split]
    idx = pool[torch.arange(n) % len(pool)]
    glyph = torch.tensor(d.images, dtype=torch.float32)[idx, None] / 16.0  # (n, 1, 8, 8)
    size = _u(g, n, 24, 32) / IMG  # glyph side as a fraction of the image
    ang = _u(g, n, -0.1, 0.1)
    tx, ty = _u(g, n, -1, 1) * (1 - size), _u(g, n, -1, 1) * (1 - size)
    c, s = torch.cos(ang) / size, torch.sin(ang) / size
    theta = torch.stack([torch.stack([c, -s, -(c * tx - s * ty)], 1), torch.stack([s, c, -(s * tx + c * ty)], 1)], 1)
    grid = F.affine_grid(theta, (n, 1, IMG, IMG), align_corners=False)
    alpha = F.grid_sample(glyph, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    img = background(g, n)
    colour = palette(g, torch.randint(0, N_HUES, (n,), generator=g)).view(n, 3, 1, 1)
    return to_uint8(img * (1 - alpha) + colour * alpha), torch.tensor(d.target)[idx]


TEXTURE_CLASSES = ("stripes", "checker", "dots", "crosshatch", "zigzag", "rings", "blotches", "speckle",
                   "marble", "gradient")


def gen_textures(g: torch.Generator, n: int, split: str):
    """Ten full-frame texture families in two random colours, at a random orientation, scale
    and phase: none of them is a pretraining label (those textures live inside objects)."""
    y = torch.randint(0, len(TEXTURE_CLASSES), (n,), generator=g)
    ang, ph = _u(g, n, 0, math.pi).view(n, 1, 1), _u(g, n, 0, 2 * math.pi).view(n, 1, 1)
    f = _u(g, n, 7, 14).view(n, 1, 1)
    u = torch.cos(ang) * GX + torch.sin(ang) * GY
    v = -torch.sin(ang) * GX + torch.cos(ang) * GY
    lowpass = lambda k, c: F.interpolate(torch.randn(n, 1, k, k, generator=g), size=(IMG, IMG), mode="bicubic",  # noqa: E731
                                         align_corners=False)[:, 0] * c
    cx, cy = _u(g, n, -0.5, 0.5).view(n, 1, 1), _u(g, n, -0.5, 0.5).view(n, 1, 1)
    pats = torch.stack([
        (torch.sin(f * u + ph) > 0).float(),
        (torch.sin(f * u + ph) * torch.sin(f * v) > 0).float(),
        ((torch.sin(f * u + ph) > 0.5) & (torch.sin(f * v) > 0.5)).float(),
        ((torch.sin(f * u + ph) > 0.85) | (torch.sin(f * v) > 0.85)).float(),
        (torch.sin(f * u + 1.2 * torch.sign(torch.sin(f * v / 2)) * (f * v / 2 % math.pi) + ph) > 0).float(),
        (torch.sin(f * (GX - cx).hypot(GY - cy) + ph) > 0).float(),
        (lowpass(5, 1.0) > 0).float(),
        (torch.rand(n, IMG, IMG, generator=g) > 0.5).float(),
        (torch.sin(f * 0.6 * u + 3 * lowpass(4, 1.0) + ph) > 0).float(),
        ((u + 1.5) / 3).clamp(0, 1),
    ])
    pattern = pats.gather(0, y.view(1, n, 1, 1).expand(1, n, IMG, IMG))[0][:, None]
    c1 = palette(g, torch.randint(0, N_HUES, (n,), generator=g)).view(n, 3, 1, 1)
    c2 = palette(g, torch.randint(0, N_HUES, (n,), generator=g)).view(n, 3, 1, 1) * _u(g, n, 0.2, 0.6).view(n, 1, 1, 1)
    return to_uint8(c2 + (c1 - c2) * pattern), y


def gen_cells(g: torch.Generator, n: int, split: str):
    """Histology-like patches (as Camelyon): purple nuclei on a pink, smoothly varying stain.
    Label 1 ("atypical") has elongated nuclei (each with probability 0.6, against 0.05 for label
    0); count, size, darkness and stained area have the same distribution in both classes, so
    the colour statistics of the patch (which a colour-only feature sees) say almost nothing:
    the nuclei's shape does."""
    y = torch.randint(0, 2, (n,), generator=g)
    pink = torch.tensor([0.93, 0.72, 0.82]).view(1, 3, 1, 1) * _u(g, n, 0.85, 1.05).view(n, 1, 1, 1)
    img = (pink + F.interpolate(torch.randn(n, 3, 4, 4, generator=g) * 0.04, size=(IMG, IMG), mode="bicubic",
                                align_corners=False)).clamp(0, 1)
    count = torch.randint(6, 15, (n,), generator=g)
    p_long = torch.where(y == 1, 0.6, 0.05)
    for k in range(14):
        radius = _u(g, n, 1.6, 3.0) * 2 / IMG
        long = torch.rand(n, generator=g) < p_long
        dark = _u(g, n, 0.5, 0.9)
        colour = torch.stack([0.45 * dark, 0.25 * dark, 0.6 * dark], 1)
        # a circle of radius r, or an ellipse of the same area (semi-axes 1.69r x 0.59r)
        shape = torch.where(long, 7, 0)
        scale = torch.where(long, radius / 0.35 ** 0.5, radius / 0.9)
        img = draw(img, shape, _u(g, n, -0.95, 0.95), _u(g, n, -0.95, 0.95), scale, _u(g, n, 0, math.pi), colour,
                   torch.zeros(n, dtype=torch.long), torch.ones(n), visible=count > k)
    return to_uint8(img), y


SPECTRUM_EXPONENTS = (0.6, 1.1, 1.6, 2.1, 2.6)


def gen_spectra(g: torch.Generator, n: int, split: str):
    """Tinted random fields whose amplitude spectrum falls as 1/f^b: the label is b (5 classes,
    jittered by +-0.2), an image statistic no pretraining label depends on."""
    y = torch.randint(0, len(SPECTRUM_EXPONENTS), (n,), generator=g)
    b = torch.tensor(SPECTRUM_EXPONENTS)[y] + _u(g, n, -0.2, 0.2)
    fy = torch.fft.fftfreq(IMG).view(-1, 1)
    fx = torch.fft.rfftfreq(IMG).view(1, -1)
    freq = fy.hypot(fx).clamp_min(1.0 / IMG)
    spec = torch.fft.rfft2(torch.randn(n, IMG, IMG, generator=g)) * freq ** (-b.view(n, 1, 1))
    field = torch.fft.irfft2(spec, s=(IMG, IMG))
    field = (field - field.mean((1, 2), keepdim=True)) / field.std((1, 2), keepdim=True)
    grey = (_u(g, n, 0.35, 0.65).view(n, 1, 1) + _u(g, n, 0.1, 0.2).view(n, 1, 1) * field)[:, None]
    tint = hsv_to_rgb(_u(g, n), _u(g, n, 0.0, 0.3), torch.ones(n)).view(n, 3, 1, 1)
    return to_uint8(grey * tint / tint.mean(1, keepdim=True)), y


def gen_count(g: torch.Generator, n: int, split: str):
    """1-8 random objects (any pretraining shape, hue, texture) in distinct cells of a jittered
    4x4 grid; the label is the count minus one (as CLEVR count)."""
    y = torch.randint(0, 8, (n,), generator=g)
    cells = torch.rand(n, 16, generator=g).argsort(1)  # a random order of the 16 cells
    img = background(g, n)
    for k in range(8):
        o = random_objects(g, n)
        cell = cells[:, k]
        cx = -0.75 + 0.5 * (cell % 4).float() + _u(g, n, -0.08, 0.08)
        cy = -0.75 + 0.5 * (cell // 4).float() + _u(g, n, -0.08, 0.08)
        img = draw(img, o["shape"], cx, cy, _u(g, n, 0.15, 0.2), o["angle"], o["colour"], o["tex"], o["freq"],
                   visible=y >= k)
    return to_uint8(img), y


def gen_position(g: torch.Generator, n: int, split: str):
    """One random object; the label is its horizontal position in 8 bins (as dSprites location)."""
    y = torch.randint(0, 8, (n,), generator=g)
    cx = -0.8 + (y.float() + torch.rand(n, generator=g)) * 0.2
    o = random_objects(g, n)
    img = draw(background(g, n), o["shape"], cx, _u(g, n, -0.8, 0.8), o["scale"], o["angle"], o["colour"],
               o["tex"], o["freq"])
    return to_uint8(img), y


def gen_orientation(g: torch.Generator, n: int, split: str):
    """One arrow (a shape never seen in pretraining), 10-16 px long; the label is its rotation in
    8 bins of 45 degrees (as dSprites orientation)."""
    y = torch.randint(0, 8, (n,), generator=g)
    angle = (y.float() + torch.rand(n, generator=g)) * (2 * math.pi / 8)
    o = random_objects(g, n)
    img = draw(background(g, n), torch.full((n,), ARROW), _u(g, n, -0.45, 0.45), _u(g, n, -0.45, 0.45),
               _u(g, n, 0.35, 0.55), angle, o["colour"], o["tex"], o["freq"])
    return to_uint8(img), y


DEPTH_BINS = (1.0, 1.5, 2.2, 3.2, 4.5)  # 4 classes of depth (the camera's units)


def gen_distance(g: torch.Generator, n: int, split: str):
    """1-3 random objects standing on a ground plane seen in perspective: an object at depth d has
    radius 0.45/d and its centre 1.3/d - 0.45 below the image's middle (radius 7 px and near the
    bottom edge at d = 1, 1.6 px just above the middle at d = 4.5). The label is the depth of
    the closest object in 4 bins (as CLEVR's distance, "depth of the closest object"); the
    others are farther and drawn behind it. An earlier version (two objects, their distance
    apart in 6 bins) was at chance for every method, full fine-tuning included."""
    y = torch.randint(0, len(DEPTH_BINS) - 1, (n,), generator=g)
    edges = torch.tensor(DEPTH_BINS)
    closest = edges[y] + (edges[y + 1] - edges[y]) * torch.rand(n, generator=g)
    count = torch.randint(1, 4, (n,), generator=g)
    depths = [closest] + [closest + 0.3 + (4.8 - closest - 0.3) * torch.rand(n, generator=g) for _ in range(2)]
    img = background(g, n)
    for k in (2, 1, 0):  # far to near
        o = random_objects(g, n)
        img = draw(img, o["shape"], _u(g, n, -0.8, 0.8), 1.3 / depths[k] - 0.45, 0.45 / depths[k], o["angle"],
                   o["colour"], o["tex"], o["freq"], visible=count > k)
    return to_uint8(img), y


@dataclass(frozen=True)
class ProxyTask:
    name: str  # configs/dataset/proxy/<name>.yaml
    group: str  # natural | specialized | structured
    num_classes: int
    generate: Callable  # (generator, n, split) -> (uint8 (n, 3, 32, 32), int64 (n,))
    like: str  # the VTAB-1k task(s) it imitates
    version: int = 1  # bump when this task's generator changes: its folders are rebuilt, its results redone


TASKS: Dict[str, ProxyTask] = {t.name: t for t in [
    ProxyTask("digits", "natural", 10, gen_digits, "svhn"),
    ProxyTask("textures", "natural", len(TEXTURE_CLASSES), gen_textures, "dtd"),
    ProxyTask("cells", "specialized", 2, gen_cells, "camelyon"),
    ProxyTask("spectra", "specialized", len(SPECTRUM_EXPONENTS), gen_spectra, "retinopathy, eurosat"),
    ProxyTask("count", "structured", 8, gen_count, "clevr_count"),
    ProxyTask("position", "structured", 8, gen_position, "dsprites_loc"),
    ProxyTask("orientation", "structured", 8, gen_orientation, "dsprites_ori"),
    ProxyTask("distance", "structured", len(DEPTH_BINS) - 1, gen_distance, "clevr_dist", version=2),
]}
register_benchmark("proxy", "Proxy benchmark", TASKS, backbone="proxy ViT (32 px, width 96)")


def get_task(name: str) -> ProxyTask:
    if name not in TASKS:
        raise ValueError(f"unknown proxy task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def generate(task: ProxyTask, split: str, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """One split of a task: a function of (task, split, seed) only."""
    key = zlib.crc32(f"{task.name}/{split}/{seed}".encode())
    return task.generate(torch.Generator().manual_seed(key), SIZES[split], split)


def write_task(task: ProxyTask, root, seed: int = 0) -> Path:
    """Write ``task`` in NOAH's layout under ``root/<task.name>`` unless a folder of this
    generator version (``VERSION`` and the task's own) and seed is there already. Written to a temporary folder and renamed, so
    concurrent runs never read a half-written task."""
    from PIL import Image

    folder = Path(root).expanduser() / task.name
    stamp = {"version": VERSION, "task_version": task.version, "seed": seed, "task": task.name, "sizes": SIZES}
    if (folder / "proxy.json").is_file() and json.loads((folder / "proxy.json").read_text()) == stamp:
        return folder
    tmp = folder.with_name(f".{task.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    lines = {}
    for split in SIZES:
        images, labels = generate(task, split, seed)
        (tmp / "images" / split).mkdir(parents=True)
        lines[split] = []
        for i, (im, y) in enumerate(zip(images.permute(0, 2, 3, 1).numpy(), labels.tolist())):
            rel = f"images/{split}/{i:06d}.png"
            Image.fromarray(im).save(tmp / rel)
            lines[split].append(f"{rel} {y}\n")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, ls in lines.items():
        (tmp / f"{split}.txt").write_text("".join(ls))
    (tmp / "proxy.json").write_text(json.dumps(stamp))
    shutil.rmtree(folder, ignore_errors=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process won the race: use its (identical) folder
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


@register_source("proxy")
def build(dcfg, protocol: str) -> DataSplits:
    from .folder import decode_cached, read_list
    from .memory import InMemoryImages
    from .transforms import ResizeSquare

    task = get_task(dcfg.task)
    if int(dcfg.num_classes) != task.num_classes:
        raise ValueError(f"dataset.num_classes={dcfg.num_classes} but proxy task {task.name} has {task.num_classes}")
    folder = write_task(task, dcfg.root, int(dcfg.get("seed", 0)))
    resize = ResizeSquare(int(dcfg.img_size), dcfg.get("interpolation", "bicubic"))
    train_split, eval_split = PROTOCOLS[protocol]

    def load(split, flip):
        listing = read_list(folder / f"{split}.txt", task.num_classes)
        images = decode_cached(listing, resize, dcfg.get("cache_dir"), f"proxy-{task.name}-{split}")
        return InMemoryImages(images, listing.labels_tensor(), dcfg.get("normalize", "half"), flip)

    return DataSplits(load(train_split, bool(dcfg.get("flip", False))), load(eval_split, False),
                      train_split, eval_split, task.num_classes)


if __name__ == "__main__":
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else "datasets/proxy"
    for t in TASKS.values():
        print(write_task(t, out))
