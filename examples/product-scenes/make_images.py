"""Draws the example's product photos: flat shapes on a transparent background, so the alpha
channel marks the product (what an inpaint job keeps). Run it to recreate images/.

    .venv/bin/python examples/product-scenes/make_images.py
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
HERE = Path(__file__).resolve().parent


def sneaker(colour: str) -> Image.Image:
    image = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((14, 58, 114, 92), radius=14, fill=colour)  # upper
    draw.rectangle((14, 88, 116, 100), fill="white")  # sole
    draw.polygon([(30, 58), (70, 30), (86, 58)], fill=colour)  # collar
    for x in range(46, 80, 8):
        draw.line((x, 52, x + 6, 60), fill="white", width=2)  # laces
    return image


def mug(colour: str) -> Image.Image:
    image = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse((82, 50, 114, 86), outline=colour, width=8)  # handle
    draw.rounded_rectangle((26, 34, 92, 108), radius=8, fill=colour)  # body
    draw.ellipse((26, 28, 92, 42), fill="#f5f0e6")  # rim
    return image


def lamp(colour: str) -> Image.Image:
    image = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.polygon([(40, 20), (88, 20), (104, 60), (24, 60)], fill=colour)  # shade
    draw.rectangle((60, 60, 68, 104), fill="#444444")  # stem
    draw.ellipse((36, 100, 92, 114), fill="#333333")  # base
    return image


def main() -> None:
    out = HERE / "images"
    out.mkdir(exist_ok=True)
    sneaker("#c0392b").save(out / "sneaker-red.png")
    mug("#2e86c1").save(out / "mug-blue.png")
    lamp("#d4ac0d").save(out / "lamp-mustard.png")


if __name__ == "__main__":
    main()
