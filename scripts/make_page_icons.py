"""Draw the farmer page's app icons (a white leaf on the page's green), as small palette PNGs.

    python scripts/make_page_icons.py   # writes edge_agent/web/static/icon-192.png and icon-512.png

Full-bleed square with the leaf inside the central 80% ("maskable": launchers may crop it to a circle).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

GREEN = (31, 111, 58)
WHITE = (255, 255, 255)
OUT = Path(__file__).resolve().parent.parent / "edge_agent" / "web" / "static"


def leaf(size: int) -> Image.Image:
    s = 4  # draw large, shrink: smooth edges
    n = size * s
    img = Image.new("RGB", (n, n), GREEN)
    d = ImageDraw.Draw(img)
    blade = Image.new("L", (n, n), 0)
    bd = ImageDraw.Draw(blade)
    bd.ellipse((0.30 * n, 0.16 * n, 0.70 * n, 0.84 * n), fill=255)  # the blade, upright
    blade = blade.rotate(-40, resample=Image.Resampling.BICUBIC, center=(n / 2, n / 2))
    img.paste(WHITE, (0, 0), blade)
    w = max(2, n // 40)
    d.line((0.30 * n, 0.72 * n, 0.66 * n, 0.36 * n), fill=GREEN, width=w)  # the midrib
    d.line((0.22 * n, 0.80 * n, 0.34 * n, 0.68 * n), fill=WHITE, width=w * 2)  # the stalk
    return img.resize((size, size), Image.Resampling.LANCZOS).quantize(colors=16)


if __name__ == "__main__":
    for px in (192, 512):
        path = OUT / f"icon-{px}.png"
        leaf(px).save(path, optimize=True)
        print(path, path.stat().st_size, "bytes")
