"""The proxy benchmark's renderer: 32-px scenes of shapes (signed distance functions) with a
hue, a texture, a position, a scale and a rotation, on a random background; shared by the
pretraining set and the transfer tasks."""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F

IMG = 32

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
