"""Sales-channel presets: what one channel wants of an image, read from a YAML file.

The file is walked as a YAML node tree (``yaml.compose``) so every error names its line and
field. Its shape (the built-in ``default_channels.yaml``, also shipped as
``examples/channels.yaml``)::

    channels:
      marketplace-main:
        description: the main picture of a listing
        size: 2000          # the longer side in pixels, or WIDTHxHEIGHT (exact)
        aspect: "1:1"       # with a plain size: the canvas's width:height
        fit: pad            # pad: all of the image on the background; crop: fill, cut edges
        background: "#FFFFFF"
        format: jpeg        # jpeg, webp or png
        quality: 90         # jpeg and webp
        max_bytes: 10000000 # lower the quality (then the size, down to min_size) to fit
        min_quality: 60
        min_size: 1600
        srgb: true          # convert to sRGB and embed its profile
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from PIL import ImageColor

from pixelmill.errors import InputError

Format = Literal["jpeg", "webp", "png"]
FORMATS: tuple[Format, ...] = ("jpeg", "webp", "png")
Fit = Literal["pad", "crop"]
FITS: tuple[Fit, ...] = ("pad", "crop")

# The built-in presets (the same file as examples/channels.yaml).
DEFAULT_PRESETS_PATH = Path(__file__).with_name("default_channels.yaml")

EXTENSIONS: dict[Format, str] = {"jpeg": "jpg", "webp": "webp", "png": "png"}
CONTENT_TYPES: dict[Format, str] = {"jpeg": "image/jpeg", "webp": "image/webp", "png": "image/png"}

# Channel names become folder names in the export.
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_SIZE_RE = re.compile(r"([0-9]+)x([0-9]+)")
_ASPECT_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?):([0-9]+(?:\.[0-9]+)?)")
MAX_SIDE = 16_383  # WebP's limit, and far past any channel's
MIN_SIDE = 16
MIN_MAX_BYTES = 1024
DEFAULT_QUALITY = 90
DEFAULT_MIN_QUALITY = 60

_FIELDS = frozenset(
    {
        "description",
        "size",
        "aspect",
        "fit",
        "background",
        "format",
        "quality",
        "max_bytes",
        "min_quality",
        "min_size",
        "srgb",
    }
)


class PresetError(InputError):
    """A problem in a presets file, located by file, YAML line and field."""


@dataclass(frozen=True)
class Preset:
    """One channel's derivative. ``width``/``height`` is the canvas for an exact size or an
    aspect; ``longer_side`` alone keeps each image's own aspect."""

    name: str
    format: Format
    longer_side: int
    width: int | None = None
    height: int | None = None
    fit: Fit = "pad"
    # An RGB colour, or None for a transparent background (png and webp only).
    background: tuple[int, int, int] | None = (255, 255, 255)
    quality: int | None = None
    max_bytes: int | None = None
    min_quality: int | None = None
    min_size: int | None = None
    srgb: bool = True
    description: str = ""

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]

    @property
    def fingerprint(self) -> str:
        """A short hash of what shapes the files (not the description), so a manifest row
        says which version of a preset made its file."""
        values = asdict(self)
        values.pop("description")
        text = json.dumps(values, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


class _Reader:
    """Validates the composed YAML tree of one presets file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._constructor = yaml.constructor.SafeConstructor()

    def error(self, node: yaml.Node | None, field: str | None, reason: str) -> PresetError:
        return PresetError(self.path, None if node is None else _line(node), field, reason)

    def scalar(self, node: yaml.Node) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            return node
        return self._constructor.construct_object(node, deep=True)

    def mapping(
        self, node: yaml.Node, field: str | None, allowed: frozenset[str] | None
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """{key: (key node, value node)}; refuses duplicate and unknown keys."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, field, "must be a mapping")
        entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            name = self.scalar(key_node)
            if not isinstance(name, str):
                raise self.error(key_node, field, f"key {name!r} must be a string")
            dotted = name if field is None else f"{field}.{name}"
            if allowed is not None and name not in allowed:
                known = ", ".join(sorted(allowed))
                raise self.error(key_node, dotted, f"unknown field (known: {known})")
            if name in entries:
                first = _line(entries[name][0])
                raise self.error(key_node, dotted, f"duplicate key (first at line {first})")
            entries[name] = (key_node, value_node)
        return entries

    def load(self, text: str) -> dict[str, Preset]:
        try:
            root = yaml.compose(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = None if mark is None else mark.line + 1
            raise PresetError(self.path, line, None, f"not valid YAML: {exc}") from None
        if root is None:
            raise self.error(None, "channels", "the file is empty: it needs a channels mapping")
        top = self.mapping(root, None, frozenset({"channels"}))
        if "channels" not in top:
            raise self.error(root, "channels", "missing: the channels and their presets")
        channels = self.mapping(top["channels"][1], "channels", None)
        if not channels:
            raise self.error(top["channels"][1], "channels", "no channel defined")
        presets = {}
        for name, (key_node, node) in channels.items():
            if not _NAME_RE.fullmatch(name):
                raise self.error(
                    key_node,
                    f"channels.{name}",
                    "a channel name is lower-case letters, digits, '-' and '_' (64 at most)",
                )
            presets[name] = self.preset(name, node)
        return presets

    def preset(self, name: str, node: yaml.Node) -> Preset:
        prefix = f"channels.{name}"
        entries = self.mapping(node, prefix, _FIELDS)
        values = {key: (self.scalar(value), value) for key, (_, value) in entries.items()}
        for required in ("size", "format"):
            if required not in values:
                raise self.error(node, f"{prefix}.{required}", "missing")
        fmt = self.choice(values["format"], f"{prefix}.format", FORMATS)
        longer, width, height = self.canvas(values, prefix)
        fields: dict[str, Any] = {
            "name": name,
            "format": fmt,
            "longer_side": longer,
            "width": width,
            "height": height,
            "fit": self.choice(values.get("fit", ("pad", node)), f"{prefix}.fit", FITS),
            "background": self.background(values.get("background"), fmt, prefix),
            "srgb": self.boolean(values.get("srgb", (True, node)), f"{prefix}.srgb"),
            "description": self.text(values.get("description"), f"{prefix}.description"),
        }
        fields.update(self.bytes_fields(values, fmt, longer, prefix))
        return Preset(**fields)

    def canvas(
        self, values: dict[str, tuple[Any, yaml.Node]], prefix: str
    ) -> tuple[int, int | None, int | None]:
        """(longer side, width, height) from ``size`` and ``aspect``."""
        size, size_node = values["size"]
        aspect = values.get("aspect")
        if isinstance(size, str) and (match := _SIZE_RE.fullmatch(size.strip())):
            if aspect is not None:
                raise self.error(
                    aspect[1], f"{prefix}.aspect", "give an aspect with a plain size only"
                )
            width = self.side(int(match[1]), size_node, f"{prefix}.size")
            height = self.side(int(match[2]), size_node, f"{prefix}.size")
            return max(width, height), width, height
        if isinstance(size, bool) or not isinstance(size, int):
            raise self.error(
                size_node, f"{prefix}.size", f"{size!r}: give pixels (2000) or WIDTHxHEIGHT"
            )
        longer = self.side(size, size_node, f"{prefix}.size")
        if aspect is None:
            return longer, None, None
        ratio = self.aspect(aspect, f"{prefix}.aspect")
        if ratio >= 1:
            width, height = longer, max(1, round(longer / ratio))
        else:
            width, height = max(1, round(longer * ratio)), longer
        return longer, width, height

    def side(self, value: int, node: yaml.Node, field: str) -> int:
        if not MIN_SIDE <= value <= MAX_SIDE:
            raise self.error(node, field, f"{value}: must be in {MIN_SIDE}..{MAX_SIDE} pixels")
        return value

    def aspect(self, entry: tuple[Any, yaml.Node], field: str) -> float:
        value, node = entry
        match = _ASPECT_RE.fullmatch(str(value).strip()) if isinstance(value, str) else None
        if match is None or float(match[1]) <= 0 or float(match[2]) <= 0:
            raise self.error(node, field, f'{value!r}: give WIDTH:HEIGHT, such as "1:1"')
        return float(match[1]) / float(match[2])

    def bytes_fields(
        self, values: dict[str, tuple[Any, yaml.Node]], fmt: Format, longer: int, prefix: str
    ) -> dict[str, Any]:
        """quality, max_bytes, min_quality and min_size, checked against each other."""
        lossy = fmt != "png"
        for name in ("quality", "min_quality"):
            if name in values and not lossy:
                raise self.error(values[name][1], f"{prefix}.{name}", "png is lossless: no quality")
        quality = self.integer(values.get("quality"), f"{prefix}.quality", 1, 100)
        if lossy and quality is None:
            quality = DEFAULT_QUALITY
        max_bytes = self.integer(
            values.get("max_bytes"), f"{prefix}.max_bytes", MIN_MAX_BYTES, 2**31 - 1
        )
        min_quality = self.integer(
            values.get("min_quality"), f"{prefix}.min_quality", 1, quality or 100
        )
        if lossy and min_quality is None:
            min_quality = min(DEFAULT_MIN_QUALITY, quality or DEFAULT_QUALITY)
        min_size = self.integer(values.get("min_size"), f"{prefix}.min_size", MIN_SIDE, longer)
        for name in ("min_quality", "min_size"):
            if name in values and max_bytes is None:
                raise self.error(values[name][1], f"{prefix}.{name}", "needs max_bytes")
        return {
            "quality": quality,
            "max_bytes": max_bytes,
            "min_quality": min_quality if max_bytes is not None else None,
            "min_size": min_size,
        }

    def integer(
        self, entry: tuple[Any, yaml.Node] | None, field: str, low: int, high: int
    ) -> int | None:
        if entry is None:
            return None
        value, node = entry
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.error(node, field, f"{value!r}: must be a whole number in {low}..{high}")
        return value

    def choice(self, entry: tuple[Any, yaml.Node], field: str, allowed: tuple[str, ...]) -> Any:
        value, node = entry
        if not isinstance(value, str) or value.strip().lower() not in allowed:
            raise self.error(node, field, f"{value!r}: use one of {', '.join(allowed)}")
        return value.strip().lower()

    def boolean(self, entry: tuple[Any, yaml.Node], field: str) -> bool:
        value, node = entry
        if not isinstance(value, bool):
            raise self.error(node, field, f"{value!r}: must be true or false")
        return value

    def text(self, entry: tuple[Any, yaml.Node] | None, field: str) -> str:
        if entry is None:
            return ""
        value, node = entry
        if not isinstance(value, str):
            raise self.error(node, field, "must be text")
        return value

    def background(
        self, entry: tuple[Any, yaml.Node] | None, fmt: Format, prefix: str
    ) -> tuple[int, int, int] | None:
        if entry is None:
            return (255, 255, 255)
        value, node = entry
        field = f"{prefix}.background"
        if isinstance(value, str) and value.strip().lower() == "transparent":
            if fmt == "jpeg":
                raise self.error(node, field, "jpeg has no transparency: give a colour")
            return None
        try:
            red, green, blue = ImageColor.getrgb(str(value))[:3]
        except ValueError:
            raise self.error(
                node, field, f'{value!r}: give a colour ("#FFFFFF", white) or transparent'
            ) from None
        return (red, green, blue)


def load_presets(path: Path | None = None) -> dict[str, Preset]:
    """The presets of a file (None: the built-in ones); raises PresetError on any problem."""
    path = Path(path) if path is not None else DEFAULT_PRESETS_PATH
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PresetError(path, None, None, f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise PresetError(path, None, None, f"not valid UTF-8: {exc.reason}") from None
    return _Reader(path).load(text)


def choose(presets: dict[str, Preset], names: list[str], path: Path | None) -> list[Preset]:
    """The named channels' presets, in the order given (each once)."""
    chosen: list[Preset] = []
    for name in dict.fromkeys(names):
        if name not in presets:
            known = ", ".join(sorted(presets))
            where = path if path is not None else DEFAULT_PRESETS_PATH
            raise PresetError(where, None, "channels", f"no channel {name!r} (known: {known})")
        chosen.append(presets[name])
    if not chosen:
        raise PresetError(path or DEFAULT_PRESETS_PATH, None, "channels", "choose a channel")
    return chosen
