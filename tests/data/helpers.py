"""Helpers of the data tests: tiny encoded images and a folder of good, broken and convertible ones."""
import io

import numpy as np
from PIL import Image

CROP = 32  # crop size of the data tests: small keeps them fast


def png_bytes(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def solid(colour, size=(48, 40)) -> Image.Image:
    return Image.new("RGB", size, colour)


# name -> (bytes, expected skip reason or None, expected conversion or None, expected centre colour or None).
# Names sort so that every bad file is followed by a plain RGB one: its replacement adds no conversion.
def broken_folder_files() -> dict[str, tuple[bytes, str | None, str | None, tuple | None]]:
    good_png = png_bytes(solid((200, 30, 30)))
    palette = Image.new("P", (48, 48), 1)
    palette.putpalette([0, 0, 0, 20, 200, 40] + [0, 0, 0] * 254)
    palette.paste(0, (0, 0, 48, 24))  # top half: palette index 0, declared transparent -> white
    gray16 = Image.fromarray(np.full((40, 48), 30000, np.uint16))  # mode I;16
    return {
        "a_good.png": (good_png, None, None, (200, 30, 30)),
        "b_zero.png": (b"", "empty", None, None),
        "c_good.jpg": (png_bytes(solid((30, 30, 200)), "JPEG", quality=95), None, None, None),
        "d_truncated.png": (good_png[: len(good_png) // 2], "corrupt", None, None),
        "e_good.png": (png_bytes(solid((30, 200, 30))), None, None, (30, 200, 30)),
        "f_text.jpg": (b"this is a text file, not a JPEG\n" * 4, "not_image", None, None),
        "g_good.png": (png_bytes(solid((90, 90, 90))), None, None, (90, 90, 90)),
        "h_gray16.png": (png_bytes(gray16), None, "high_bit_depth", (117, 117, 117)),  # 30000/65535*255
        "i_cmyk.jpg": (png_bytes(Image.new("CMYK", (48, 48), (0, 255, 255, 0)), "JPEG", quality=95), None, "cmyk",
                       None),
        "j_palette.png": (png_bytes(palette, transparency=0), None, "palette", None),
        "k_tiny.png": (png_bytes(solid((10, 120, 250), (10, 10))), None, "upscaled", (10, 120, 250)),
    }
