"""Every request limit of the classifier (its settings, services/runtime/config.py), and the
checks of names and integer fields that use them."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from services.contracts import imaging
from services.runtime import bad_request
from services.runtime.config import ClassifierSettings
from services.runtime.errors import shown

NAME_PATTERN = re.compile(r"^[\w][\w .'@+-]*$")  # letters/digits (any script), space . ' @ + - _
INTEGER = re.compile(r"[+-]?[0-9]{1,20}")  # ASCII digits only; 20 is past any limit's range


class Limits:
    def __init__(self, settings: ClassifierSettings):
        self.images_per_request = settings.images_per_request
        self.image = imaging.Limits(max_file_bytes=settings.image_bytes, max_pixels=settings.image_pixels,
                                    max_side=settings.image_side)
        # Decoded pixels per request, all images together: one request within the other limits
        # (32 images of 20000 x 2000) could otherwise take 37 s of CPU and 760 MB.
        self.request_pixels = settings.request_pixels
        self.name_length = settings.name_length
        self.taught_examples = settings.taught_examples
        # Body limit of /state/import: room for an export at MAX_TAUGHT_EXAMPLES, so whatever the
        # service exports can be imported back (MAX_IMPORT_BYTES overrides it).
        self.import_bytes = settings.import_bytes
        self.similar = 50

    def describe(self) -> dict:
        return {"max_images_per_request": self.images_per_request, "max_image_bytes": self.image.max_file_bytes,
                "max_image_pixels": self.image.max_pixels, "max_image_side": self.image.max_side,
                "max_request_pixels": self.request_pixels,
                "max_name_length": self.name_length, "max_taught_examples": self.taught_examples,
                "max_import_bytes": self.import_bytes, "image_formats": sorted(imaging.FORMATS)}


def int_field(value: Any, field: str, low: int, high: int) -> int:
    """A whole number in ASCII digits (spaces around it are dropped): Python's int() would also
    take "١", "1_000" and a bool, which no client means as a number."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and INTEGER.fullmatch(value.strip(" \t")):
        number = int(value.strip(" \t"))
    else:
        raise bad_request("invalid_field", f"{field} must be an integer, got {shown(value, 40)}", field) from None
    if not low <= number <= high:
        raise bad_request("invalid_field", f"{field} must be between {low} and {high}, got {number}", field)
    return number


def check_name(name: Any, max_length: int, field: str = "name") -> str:
    """A taught name, in Unicode NFC: "café" typed with a combining accent is the same name as
    the precomposed one."""
    if not isinstance(name, str) or not name:
        raise bad_request("invalid_name", f"{field} is required: a non-empty string", field)
    name = unicodedata.normalize("NFC", name)
    if len(name) > max_length:
        raise bad_request("invalid_name", f"{field} has {len(name)} characters, over the limit of {max_length} "
                          "(MAX_NAME_LENGTH)", field)
    if name != name.strip() or not NAME_PATTERN.match(name):
        raise bad_request("invalid_name", f"{field} {shown(name, 40)} may hold letters, digits, spaces and . ' @ + - _, "
                          "starting with a letter, digit or _, without leading or trailing spaces", field)
    return name
