"""A small self-contained PNG line-plot writer (numpy rasterisation + zlib + struct; no matplotlib).

`line_plot_png(path, panels)` stacks one panel per metric: a title, a frame, 1-2-5 "nice" ticks with labels
from a built-in 5×7 bitmap font, a dashed zero line where zero is in range, and one or more polylines.
It is meant for the demo's three curves (gold reward, learned reward, KL over PPO steps), not as a general
plotting library. `write_png` encodes any H×W×3 uint8 array.
"""
from __future__ import annotations

import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

# 5×7 glyphs, one string of 7 rows × 5 columns per character ('#' = ink). Lowercase renders as uppercase.
_GLYPHS = {
    '0': ".###.#...##..###.#.###..##...#.###.", '1': "..#...##....#....#....#....#...###.",
    '2': ".###.#...#....#...#...#...#...#####", '3': "#####...#...#.....#.....##...#.###.",
    '4': "...#...##..#.#.#..#.#####...#....#.", '5': "######....####.....#....##...#.###.",
    '6': "..##..#...#....####.#...##...#.###.", '7': "#####....#...#...#...#....#....#...",
    '8': ".###.#...##...#.###.#...##...#.###.", '9': ".###.#...##...#.####....#...#..##..",
    'A': ".###.#...##...#######...##...##...#", 'B': "####.#...##...#####.#...##...#####.",
    'C': ".###.#...##....#....#....#...#.###.", 'D': "###..#..#.#...##...##...##..#.###..",
    'E': "######....#....####.#....#....#####", 'F': "######....#....####.#....#....#....",
    'G': ".###.#...##....#.####...##...#.####", 'H': "#...##...##...#######...##...##...#",
    'I': ".###...#....#....#....#....#...###.", 'J': "..###...#....#....#....#.#..#..##..",
    'K': "#...##..#.#.#..##...#.#..#..#.#...#", 'L': "#....#....#....#....#....#....#####",
    'M': "#...###.###.#.##.#.##...##...##...#", 'N': "#...##...###..##.#.##..###...##...#",
    'O': ".###.#...##...##...##...##...#.###.", 'P': "####.#...##...#####.#....#....#....",
    'Q': ".###.#...##...##...##.#.##..#..##.#", 'R': "####.#...##...#####.#.#..#..#.#...#",
    'S': ".#####....#.....###.....#....#####.", 'T': "#####..#....#....#....#....#....#..",
    'U': "#...##...##...##...##...##...#.###.", 'V': "#...##...##...##...##...#.#.#...#..",
    'W': "#...##...##...##.#.##.#.##.#.#.#.#.", 'X': "#...##...#.#.#...#...#.#.#...##...#",
    'Y': "#...##...#.#.#...#....#....#....#..", 'Z': "#####....#...#...#...#...#....#####",
    '.': "..........................##...##..", '-': "...............#####...............",
    '+': ".......#....#..#####..#....#.......", '(': "...#...#...#....#....#.....#.....#.",
    ')': ".#.....#.....#....#....#...#...#...", '/': ".........#...#...#...#...#.........",
    ':': "......##...##........##...##.......", '=': "..........#####.....#####..........",
    '_': "..............................#####", '%': "##...##..#...#...#...#...#..##...##",
    ',': ".....................##....#...#...", ' ': "...................................",
    '|': "..#....#....#....#....#....#....#..", "'": "..#....#...........................",
}
_GLYPH_W, _GLYPH_H = 5, 7

WHITE = (255, 255, 255)
BLACK = (30, 30, 30)
GREY = (170, 170, 170)
LIGHT = (232, 232, 232)
COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an H×W×3 uint8 image (8-bit truecolour, no interlace, filter 0 on every row)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb: need an H×W×3 uint8 array, got shape {rgb.shape} dtype {rgb.dtype}")
    h, w, _ = rgb.shape
    if h < 1 or w < 1:
        raise ValueError(f"rgb: empty image {rgb.shape}")
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw, 9))
            + _png_chunk(b"IEND", b""))


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    data = encode_png(rgb)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Decode a PNG written by `write_png` (8-bit RGB, filter 0) back to H×W×3; for tests and checks."""
    data = open(path, "rb").read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"path: {path} is not a PNG")
    pos, idat, size = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise ValueError(f"path: bad CRC in chunk {kind!r}")
        if kind == b"IHDR":
            w, h, depth, ctype = struct.unpack(">IIBB", body[:10])
            if (depth, ctype) != (8, 2):
                raise ValueError(f"path: only 8-bit RGB is supported, got depth {depth} colour type {ctype}")
            size = (h, w)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    if size is None:
        raise ValueError(f"path: {path} has no IHDR")
    h, w = size
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    if raw[:, 0].any():
        raise ValueError("path: only filter type 0 is supported")
    return raw[:, 1:].reshape(h, w, 3).copy()


class Canvas:
    """An RGB raster with the few drawing primitives the plot needs (pixel coordinates, y down)."""

    def __init__(self, width: int, height: int, background=WHITE):
        self.img = np.empty((height, width, 3), np.uint8)
        self.img[:] = background
        self.h, self.w = height, width

    def rect(self, x0, y0, x1, y1, color, fill=False):
        x0, x1 = sorted((int(round(x0)), int(round(x1))))
        y0, y1 = sorted((int(round(y0)), int(round(y1))))
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, self.w - 1), min(y1, self.h - 1)
        if x0 > x1 or y0 > y1:
            return
        if fill:
            self.img[y0:y1 + 1, x0:x1 + 1] = color
        else:
            self.img[y0, x0:x1 + 1] = color
            self.img[y1, x0:x1 + 1] = color
            self.img[y0:y1 + 1, x0] = color
            self.img[y0:y1 + 1, x1] = color

    def hline(self, x0, x1, y, color, dash: int = 0):
        y = int(round(y))
        if not 0 <= y < self.h:
            return
        xs = np.arange(max(int(round(x0)), 0), min(int(round(x1)), self.w - 1) + 1)
        if dash:
            xs = xs[(xs // dash) % 2 == 0]
        self.img[y, xs] = color

    def polyline(self, xs, ys, color, width: float = 2.0):
        """Connect the points with a line `width` pixels thick (stamped discs along each segment)."""
        xs, ys = np.asarray(xs, float), np.asarray(ys, float)
        if len(xs) == 1:
            px, py = xs, ys
        else:
            pts_x, pts_y = [], []
            for i in range(len(xs) - 1):
                n = int(max(abs(xs[i + 1] - xs[i]), abs(ys[i + 1] - ys[i]))) * 2 + 2
                t = np.linspace(0.0, 1.0, n)
                pts_x.append(xs[i] + t * (xs[i + 1] - xs[i]))
                pts_y.append(ys[i] + t * (ys[i + 1] - ys[i]))
            px, py = np.concatenate(pts_x), np.concatenate(pts_y)
        r = width / 2.0
        k = int(math.ceil(r))
        offs = [(dx, dy) for dx in range(-k, k + 1) for dy in range(-k, k + 1) if dx * dx + dy * dy <= r * r + 0.25]
        for dx, dy in offs:
            qx = np.round(px + dx).astype(int)
            qy = np.round(py + dy).astype(int)
            ok = (qx >= 0) & (qx < self.w) & (qy >= 0) & (qy < self.h)
            self.img[qy[ok], qx[ok]] = color

    def text(self, x, y, s: str, color=BLACK, scale: int = 1, anchor: str = "left"):
        """Draw `s` with its top at y; anchor 'left', 'center' or 'right' at x. Unknown characters draw as '?'-less blanks."""
        s = s.upper()
        width = text_width(s, scale)
        x = int(round(x - (width if anchor == "right" else width / 2 if anchor == "center" else 0)))
        y = int(round(y))
        for ch in s:
            glyph = _GLYPHS.get(ch, _GLYPHS[" "])
            for row in range(_GLYPH_H):
                for col in range(_GLYPH_W):
                    if glyph[row * _GLYPH_W + col] == "#":
                        self.rect(x + col * scale, y + row * scale, x + (col + 1) * scale - 1,
                                  y + (row + 1) * scale - 1, color, fill=True)
            x += (_GLYPH_W + 1) * scale


def text_width(s: str, scale: int = 1) -> int:
    return max(len(s) * (_GLYPH_W + 1) * scale - scale, 0)


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 × 10^k) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"lo/hi: need finite bounds, got {lo}, {hi}")
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + 1e-9 * step:
        ticks.append(0.0 if abs(t) < step * 1e-9 else t)
        t += step
    return ticks


def _fmt(v: float, step: float) -> str:
    if step >= 1 and abs(v) < 1e6:
        return f"{v:.0f}"
    digits = max(0, -int(math.floor(math.log10(step))))
    return f"{v:.{min(digits, 6)}f}"


@dataclass
class Panel:
    """One plot panel: a title and series of (x values, y values), one colour each."""

    title: str
    series: Sequence[tuple[Sequence[float], Sequence[float]]]
    colors: Sequence[tuple[int, int, int]] = field(default_factory=lambda: COLORS)
    xlabel: str = ""


def render(panels: Sequence[Panel], width: int = 900, panel_height: int = 250, title: str = "") -> np.ndarray:
    """Rasterise `panels` stacked vertically; returns an H×W×3 uint8 image. NaN/inf points are skipped."""
    if not panels:
        raise ValueError("panels: need at least one panel")
    top = 36 if title else 8
    canvas = Canvas(width, top + panel_height * len(panels))
    if title:
        canvas.text(width / 2, 10, title, scale=2, anchor="center")
    left, right, ptop, pbottom = 80, 24, 30, 36
    for i, panel in enumerate(panels):
        y_off = top + i * panel_height
        x0, x1 = left, width - right
        y0, y1 = y_off + ptop, y_off + panel_height - pbottom
        canvas.text((x0 + x1) / 2, y_off + 6, panel.title, scale=2, anchor="center",
                    color=panel.colors[0] if len(panel.series) == 1 else BLACK)
        pts = [(np.asarray(xs, float), np.asarray(ys, float)) for xs, ys in panel.series]
        if any(len(xs) != len(ys) for xs, ys in pts):
            raise ValueError(f"panels: series of {panel.title!r} have x and y of different lengths")
        finite = [(xs[np.isfinite(ys) & np.isfinite(xs)], ys[np.isfinite(ys) & np.isfinite(xs)]) for xs, ys in pts]
        all_x = np.concatenate([xs for xs, _ in finite]) if finite else np.array([])
        all_y = np.concatenate([ys for _, ys in finite]) if finite else np.array([])
        if all_x.size == 0:
            canvas.rect(x0, y0, x1, y1, GREY)
            canvas.text((x0 + x1) / 2, (y0 + y1) / 2, "NO DATA", anchor="center")
            continue
        xlo, xhi = float(all_x.min()), float(all_x.max())
        ylo, yhi = float(all_y.min()), float(all_y.max())
        if xhi <= xlo:
            xlo, xhi = xlo - 0.5, xhi + 0.5
        pad = (yhi - ylo) * 0.08 if yhi > ylo else max(abs(yhi) * 0.1, 0.05)
        ylo, yhi = ylo - pad, yhi + pad
        yt, xt = nice_ticks(ylo, yhi, 4), nice_ticks(xlo, xhi, 8)
        ylo, yhi = min(ylo, yt[0]), max(yhi, yt[-1])

        def sx(v):
            return x0 + (np.asarray(v, float) - xlo) / (xhi - xlo) * (x1 - x0)

        def sy(v):
            return y1 - (np.asarray(v, float) - ylo) / (yhi - ylo) * (y1 - y0)

        ystep = yt[1] - yt[0] if len(yt) > 1 else 1.0
        xstep = xt[1] - xt[0] if len(xt) > 1 else 1.0
        for t in yt:
            canvas.hline(x0, x1, sy(t), LIGHT)
            canvas.text(x0 - 6, sy(t) - 3, _fmt(t, ystep), anchor="right")
        for t in xt:
            if xlo <= t <= xhi:
                canvas.rect(sx(t), y1, sx(t), y1 + 4, BLACK, fill=True)
                canvas.text(sx(t), y1 + 8, _fmt(t, xstep), anchor="center")
        if ylo < 0 < yhi:
            canvas.hline(x0, x1, sy(0.0), GREY, dash=6)
        canvas.rect(x0, y0, x1, y1, BLACK)
        if panel.xlabel:
            canvas.text(x1, y1 + 20, panel.xlabel, anchor="right", color=GREY)
        for j, (xs, ys) in enumerate(finite):
            if xs.size:
                canvas.polyline(sx(xs), sy(ys), panel.colors[j % len(panel.colors)])
    return canvas.img


def line_plot_png(path: str | os.PathLike, panels: Sequence[Panel], title: str = "", width: int = 900,
                  panel_height: int = 250) -> str:
    """Render `panels` and write them to `path` as a PNG; returns the path."""
    write_png(path, render(panels, width=width, panel_height=panel_height, title=title))
    return str(path)
