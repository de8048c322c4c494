"""Image decoding for every mode PIL can open, as the mappers need it: an 8-bit H×W×C array.

detectron2's ``read_image`` converts with ``Image.convert("RGB")``, which *clips* 16- and 32-bit samples
to 255 instead of rescaling them: a 16-bit grayscale PNG (PIL mode ``I;16``) comes out all white. Here
high-bit-depth samples are rescaled to 8 bits first (16-bit: ``v / 257``, i.e. 65535 → 255; 32-bit
integer images that hold 16-bit data, as PIL opens some 16-bit PNGs, likewise; float images in
``[0, 1]`` × 255, otherwise clipped), then the image is converted to RGB:

* ``RGBA``, ``LA``, ``PA`` and palette images with transparency: the alpha channel is dropped (the
  colour under transparent pixels is kept, as detectron2 and torchvision do); ``tools/validate_dataset.py``
  warns about it;
* ``CMYK``, ``YCbCr``, ``1``, ``L``, ``P``: PIL's conversion (no ICC colour management);
* ``LAB``/``HSV``: PIL's conversion where it has one, else a ``ValueError`` naming the mode.

The EXIF orientation is applied (as detectron2 does), so annotations must be in the rotated frame.
"""

import numpy as np
from detectron2.data.detection_utils import convert_PIL_to_numpy
from PIL import Image, ImageOps

__all__ = ["read_image", "to_rgb"]

_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def _scaled_to_8bit(image: Image.Image) -> Image.Image:
    """A mode ``L`` image with high-bit-depth samples rescaled to 0..255 (module doc: the rule)."""
    arr = np.asarray(image)
    if image.mode == "F":
        arr = arr.astype(np.float64)
        arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.min() >= 0 and arr.max() <= 1:
            arr = arr * 255.0
    else:
        arr = arr.astype(np.int64)
        # mode I holds 16-bit PNG data (0..65535) unless its values say otherwise; 8-bit data stays as is
        if image.mode in _16BIT_MODES or (arr.size and arr.max() > 255):
            arr = arr / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image → an 8-bit RGB image (module doc: how each mode is treated)."""
    if image.mode == "RGB":
        return image
    if image.mode in _16BIT_MODES + ("I", "F"):
        image = _scaled_to_8bit(image)
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when a transparent palette image goes straight to RGB
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise ValueError(f"PIL cannot convert mode {image.mode} to RGB ({e})")


def read_image(file_name: str, format: str = "RGB") -> np.ndarray:
    """The image at ``file_name`` as detectron2's ``read_image`` returns it (H×W×3 uint8 in ``format``,
    EXIF orientation applied), with high-bit-depth modes rescaled instead of clipped."""
    with open(file_name, "rb") as f:
        image = Image.open(f)
        image.load()
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # a damaged EXIF block: keep the stored orientation, as detectron2 does
            pass
        image = to_rgb(image)
    if format == "L":
        image = image.convert("L")
        return np.expand_dims(np.asarray(image), -1)
    return convert_PIL_to_numpy(image, format)
