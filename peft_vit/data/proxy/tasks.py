"""The eight transfer tasks, in VTAB-1k's spirit: each a generator ``(generator, n, split) ->
(uint8 images, labels)`` and a :class:`ProxyTask` in :data:`TASKS`. Their labels are none of the
pretraining labels: a new shape (the arrow), new textures, sklearn's digits, noise spectra, and
the nuisances themselves (count, position, orientation, distance)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from .render import ARROW, GX, GY, IMG, N_HUES, _u, background, draw, hsv_to_rgb, palette, random_objects, to_uint8


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


def get_task(name: str) -> ProxyTask:
    if name not in TASKS:
        raise ValueError(f"unknown proxy task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]
