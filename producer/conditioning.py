"""Template fields beyond the prompt: the job's kind, its catalogue image, and adapters.

In a template (or in ``defaults``)::

    kind: inpaint            # txt2img (default), img2img, inpaint or controlnet
    image: photo             # the catalogue column holding the product image
    strength: 0.9            # img2img (default 0.75) and inpaint: 0 < strength <= 1
    mask: alpha              # inpaint: alpha, {column: mask} or {keep_box: [l, t, r, b]}
    controlnet:              # controlnet
      model: controlnets/canny   # a diffusers folder (relative to this file), a hub id,
                                 # or tiny-controlnet (the workers' built-in tiny one)
      conditioning: canny        # canny (edges of the image) or image (it is the control)
      scale: 1.0
      low_threshold: 100         # canny only
      high_threshold: 200
    loras:                   # any kind
      - {path: loras/linen.safetensors, scale: 0.8}
    embeddings:              # any kind; the token is used in the prompt as written
      - {path: embeddings/brand.safetensors, token: "<brand>"}

A template's own value wins over the one in ``defaults`` (lists are replaced, not merged).
A field a kind does not use is an error in the template itself, and is left out when it
comes from ``defaults`` (so ``defaults`` may name the image column for a file mixing kinds).

Paths are relative to the template file's folder (or absolute) and must exist where the
producer runs; the workers see them at the same absolute paths, as they do local models.
Adapter files are hashed (sha256) into the job's options, so the dedupe key changes when an
adapter file's contents do.

This module checks the YAML nodes the loader (:mod:`producer.templates`) hands over and
builds :class:`db.job_options.JobOptions`, the contract the workers read.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from db.job_options import ControlNetSpec, EmbeddingRef, JobOptions, LoraRef, MaskSpec
from db.models import JobKind
from pixelmill.errors import InputError
from pixelmill.hashing import file_sha256
from pixelmill.settings import TINY_CONTROLNET, is_hub_id

CONDITIONING_KEYS = frozenset(
    {"kind", "image", "strength", "mask", "controlnet", "loras", "embeddings"}
)
# The kinds that start from the catalogue's image.
IMAGE_KINDS = frozenset({JobKind.IMG2IMG, JobKind.INPAINT, JobKind.CONTROLNET})
# The fields only some kinds take (loras and embeddings apply to every kind), and the error
# for a template of another kind that sets one.
_KIND_FIELDS: dict[str, tuple[frozenset[str], str]] = {
    "image": (IMAGE_KINDS, "use kind img2img, inpaint or controlnet to start from an image"),
    "strength": (frozenset({JobKind.IMG2IMG, JobKind.INPAINT}), "only img2img and inpaint do"),
    "mask": (frozenset({JobKind.INPAINT}), "only inpaint does"),
    "controlnet": (frozenset({JobKind.CONTROLNET}), "set kind: controlnet"),
}
# A1111's default denoising strength; written into the job so the dedupe key covers it.
DEFAULT_IMG2IMG_STRENGTH = 0.75
_CONTROLNET_KEYS = frozenset({"model", "conditioning", "scale", "low_threshold", "high_threshold"})
_MAX_CONTROLNET_SCALE = 5.0
_MAX_LORA_SCALE = 10.0

Entry = tuple[yaml.Node, yaml.Node]  # (key node, value node) of one mapping entry


class NodeReader(Protocol):
    """What this module needs from the template loader (producer.templates.loader)."""

    def error(self, node: yaml.Node | None, field: str | None, reason: str) -> InputError: ...

    def mapping(
        self, node: yaml.Node, field: str | None, allowed: frozenset[str] | None
    ) -> dict[str, Entry]: ...

    def scalar(self, node: yaml.Node) -> Any: ...


@dataclass(frozen=True)
class Conditioning:
    """A template's kind, the catalogue columns its images come from, and its job options."""

    kind: str = JobKind.TXT2IMG.value
    image: str | None = None  # catalogue column of the product image
    mask_column: str | None = None  # catalogue column of the mask image (mask: {column: ...})
    options: JobOptions = field(default_factory=JobOptions)

    def columns(self) -> tuple[str, ...]:
        """The catalogue columns holding images (the image's first)."""
        return tuple(column for column in (self.image, self.mask_column) if column is not None)

    @property
    def mask_from_alpha(self) -> bool:
        return self.options.mask is not None and self.options.mask.source == "alpha"


class FileHasher:
    """sha256 of adapter files: each file is read once however many templates use it."""

    def __init__(self) -> None:
        self._known: dict[str, str] = {}

    def __call__(self, path: str) -> str:
        digest = self._known.get(path)
        if digest is None:
            digest = self._known[path] = file_sha256(Path(path))
        return digest


def _number(value: Any) -> bool:
    # bool is an int subclass: "scale: yes" is a typo, not 1.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class _TemplateFields:
    """One template's entries and the defaults', once its kind is known."""

    own: dict[str, Entry]
    defaults: dict[str, Entry]
    prefix: str
    node: yaml.Node  # the template's mapping: where a missing field is reported
    kind: str

    def pick(self, name: str) -> tuple[str, yaml.Node] | None:
        """(dotted field, value node) of the value used: the template's own, else the
        defaults' where this kind takes it."""
        if name in self.own:
            return f"{self.prefix}.{name}", self.own[name][1]
        usable = name not in _KIND_FIELDS or self.kind in _KIND_FIELDS[name][0]
        if name in self.defaults and usable:
            return f"defaults.{name}", self.defaults[name][1]
        return None


class ConditioningReader:
    """Reads the fields above for one template, given its entries and the defaults'."""

    def __init__(self, reader: NodeReader, base: Path, hasher: FileHasher) -> None:
        self.reader = reader
        self.base = base  # the template file's folder: relative paths start here
        self.hasher = hasher

    def read(
        self,
        own: dict[str, Entry],
        defaults: dict[str, Entry],
        *,
        prefix: str,
        node: yaml.Node,
        width: int,
        height: int,
    ) -> Conditioning:
        """``own``/``defaults``: the template's and the defaults' entries; ``node``: the
        template's mapping (where a missing field is reported)."""
        kind = self._template_kind(own, defaults, prefix)
        for name, (kinds, hint) in _KIND_FIELDS.items():
            if name in own and kind not in kinds:
                raise self.reader.error(
                    own[name][0], f"{prefix}.{name}", f"kind {kind!r} takes no {name} ({hint})"
                )
        fields = _TemplateFields(own, defaults, prefix, node, kind)
        image = self._read_image(fields)
        strength = self._read_strength(fields)
        mask, mask_column = self._read_mask(fields, image=image, width=width, height=height)
        controlnet = self._read_controlnet(fields)
        loras: tuple[LoraRef, ...] = ()
        if (located_loras := fields.pick("loras")) is not None:
            loras = self._loras(*located_loras)
        embeddings: tuple[EmbeddingRef, ...] = ()
        if (located_embeddings := fields.pick("embeddings")) is not None:
            embeddings = self._embeddings(*located_embeddings)
        options = JobOptions(
            strength=strength,
            mask=mask,
            controlnet=controlnet,
            loras=loras,
            embeddings=embeddings,
        )
        return Conditioning(kind=kind, image=image, mask_column=mask_column, options=options)

    def _template_kind(self, own: dict[str, Entry], defaults: dict[str, Entry], prefix: str) -> str:
        located = own.get("kind") or defaults.get("kind")
        if located is None:
            return JobKind.TXT2IMG.value
        field_name = f"{prefix}.kind" if "kind" in own else "defaults.kind"
        return self._kind(located[1], field_name)

    def _missing(self, fields: _TemplateFields, name: str, reason: str) -> InputError:
        return self.reader.error(fields.node, f"{fields.prefix}.{name}", reason)

    def _read_image(self, fields: _TemplateFields) -> str | None:
        if (located := fields.pick("image")) is not None:
            return self._column(*located)
        if fields.kind in IMAGE_KINDS:
            raise self._missing(
                fields,
                "image",
                f"is required for kind {fields.kind!r}: the catalogue column holding the "
                "product image",
            )
        return None

    def _read_strength(self, fields: _TemplateFields) -> float | None:
        if (located := fields.pick("strength")) is not None:
            return self._strength(*located)
        if fields.kind == JobKind.IMG2IMG:
            return DEFAULT_IMG2IMG_STRENGTH
        return None

    def _read_mask(
        self, fields: _TemplateFields, *, image: str | None, width: int, height: int
    ) -> tuple[MaskSpec | None, str | None]:
        if (located := fields.pick("mask")) is not None:
            return self._mask(*located, image=image, width=width, height=height)
        if fields.kind == JobKind.INPAINT:
            raise self._missing(
                fields,
                "mask",
                "is required for kind 'inpaint': alpha, {column: NAME} or "
                "{keep_box: [left, top, right, bottom]}",
            )
        return None, None

    def _read_controlnet(self, fields: _TemplateFields) -> ControlNetSpec | None:
        if (located := fields.pick("controlnet")) is not None:
            return self._controlnet(*located)
        if fields.kind == JobKind.CONTROLNET:
            raise self._missing(
                fields,
                "controlnet",
                "is required for kind 'controlnet': {model: FOLDER, conditioning: canny}",
            )
        return None

    # ------------------------------------------------------------------ fields

    def _kind(self, node: yaml.Node, field_name: str) -> str:
        value = self.reader.scalar(node)
        kinds = [kind.value for kind in JobKind]
        if value not in kinds:
            raise self.reader.error(node, field_name, f"must be one of {', '.join(kinds)}")
        return str(value)

    def _column(self, field_name: str, node: yaml.Node) -> str:
        value = self.reader.scalar(node)
        if not isinstance(value, str) or not value.strip():
            raise self.reader.error(node, field_name, "must be a catalogue column name")
        return value.strip()

    def _strength(self, field_name: str, node: yaml.Node) -> float:
        value = self.reader.scalar(node)
        if not _number(value) or not 0 < value <= 1:
            raise self.reader.error(node, field_name, "must be a number with 0 < strength <= 1")
        return float(value)

    def _mask(
        self, field_name: str, node: yaml.Node, *, image: str | None, width: int, height: int
    ) -> tuple[MaskSpec, str | None]:
        usage = "must be alpha, {column: NAME} or {keep_box: [left, top, right, bottom]}"
        if isinstance(node, yaml.ScalarNode):
            if self.reader.scalar(node) != "alpha":
                raise self.reader.error(node, field_name, usage)
            return MaskSpec(source="alpha"), None
        if not isinstance(node, yaml.MappingNode):
            raise self.reader.error(node, field_name, usage)
        entries = self.reader.mapping(node, field_name, frozenset({"column", "keep_box"}))
        if len(entries) != 1:
            raise self.reader.error(node, field_name, usage)
        if "column" in entries:
            column_field = f"{field_name}.column"
            column = self._column(column_field, entries["column"][1])
            if column == image:
                raise self.reader.error(
                    entries["column"][1], column_field, "must differ from the image column"
                )
            return MaskSpec(source="column"), column
        box_field, box_node = f"{field_name}.keep_box", entries["keep_box"][1]
        box = self._box(box_field, box_node, width=width, height=height)
        return MaskSpec(source="box", keep_box=box), None

    def _box(
        self, field_name: str, node: yaml.Node, *, width: int, height: int
    ) -> tuple[int, int, int, int]:
        rule = (
            f"must be [left, top, right, bottom] in output pixels, with "
            f"0 <= left < right <= {width} (width) and 0 <= top < bottom <= {height} (height)"
        )
        if not isinstance(node, yaml.SequenceNode) or len(node.value) != 4:
            raise self.reader.error(node, field_name, rule)
        values = [self.reader.scalar(item) for item in node.value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise self.reader.error(node, field_name, rule)
        left, top, right, bottom = values
        if not (0 <= left < right <= width and 0 <= top < bottom <= height):
            raise self.reader.error(node, field_name, rule)
        return left, top, right, bottom

    def _controlnet(self, field_name: str, node: yaml.Node) -> ControlNetSpec:
        entries = self.reader.mapping(node, field_name, _CONTROLNET_KEYS)
        if "model" not in entries:
            raise self.reader.error(node, f"{field_name}.model", "is required")
        values: dict[str, Any] = {
            "model": self._controlnet_model(f"{field_name}.model", entries["model"][1])
        }
        if "conditioning" in entries:
            sub_node = entries["conditioning"][1]
            value = self.reader.scalar(sub_node)
            if value not in ("canny", "image"):
                raise self.reader.error(
                    sub_node, f"{field_name}.conditioning", "must be canny or image"
                )
            values["conditioning"] = value
        if "scale" in entries:
            sub_node = entries["scale"][1]
            value = self.reader.scalar(sub_node)
            if not _number(value) or not 0 <= value <= _MAX_CONTROLNET_SCALE:
                raise self.reader.error(
                    sub_node,
                    f"{field_name}.scale",
                    f"must be a number between 0 and {_MAX_CONTROLNET_SCALE:g}",
                )
            values["scale"] = float(value)
        for name in ("low_threshold", "high_threshold"):
            if name not in entries:
                continue
            sub_node = entries[name][1]
            if values.get("conditioning", "canny") != "canny":
                raise self.reader.error(
                    sub_node, f"{field_name}.{name}", "applies only to conditioning: canny"
                )
            value = self.reader.scalar(sub_node)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 255:
                raise self.reader.error(
                    sub_node, f"{field_name}.{name}", "must be an integer in 0..255"
                )
            values[name] = value
        spec = ControlNetSpec(**values)
        if spec.low_threshold >= spec.high_threshold:
            raise self.reader.error(
                node,
                f"{field_name}.low_threshold",
                f"must be below high_threshold ({spec.low_threshold} >= {spec.high_threshold})",
            )
        return spec

    def _controlnet_model(self, field_name: str, node: yaml.Node) -> str:
        value = self.reader.scalar(node)
        if not isinstance(value, str) or not value.strip():
            raise self.reader.error(
                node, field_name, "must be a diffusers ControlNet folder or a hub id"
            )
        value = value.strip()
        path = Path(value).expanduser()
        local = path if path.is_absolute() else self.base / path
        if local.is_dir():
            return os.path.abspath(local)
        if local.exists():
            raise self.reader.error(
                node, field_name, f"{local} is a file; give a diffusers ControlNet folder"
            )
        if value == TINY_CONTROLNET:  # built by the workers (worker.models)
            return value
        if not path.is_absolute() and not value.startswith(".") and is_hub_id(value):
            return value  # a hub id, loaded by the workers
        raise self.reader.error(
            node,
            field_name,
            f"no such folder: {os.path.abspath(local)} (paths are relative to the template "
            "file; a hub id is owner/name)",
        )

    def _adapter_list(self, field_name: str, node: yaml.Node) -> list[tuple[str, yaml.Node]]:
        if isinstance(node, yaml.ScalarNode) and self.reader.scalar(node) is None:
            return []
        if not isinstance(node, yaml.SequenceNode):
            raise self.reader.error(node, field_name, "must be a list")
        return [(f"{field_name}[{index}]", item) for index, item in enumerate(node.value)]

    def _adapter_file(self, field_name: str, node: yaml.Node) -> tuple[str, str]:
        """The adapter's absolute path and its sha256."""
        value = self.reader.scalar(node)
        if not isinstance(value, str) or not value.strip():
            raise self.reader.error(node, field_name, "must be a file path")
        path = Path(value.strip()).expanduser()
        absolute = os.path.abspath(path if path.is_absolute() else self.base / path)
        if not os.path.isfile(absolute):
            reason = "is not a file" if os.path.exists(absolute) else "no such file"
            raise self.reader.error(
                node, field_name, f"{reason}: {absolute} (paths are relative to the template file)"
            )
        if not absolute.lower().endswith(".safetensors"):
            # .ckpt, .pt and .bin adapters are pickles: loading one can run code.
            raise self.reader.error(
                node, field_name, f"{absolute}: must be a .safetensors file (not a pickle)"
            )
        try:
            return absolute, self.hasher(absolute)
        except OSError as exc:
            raise self.reader.error(
                node, field_name, f"cannot read {absolute}: {exc.strerror}"
            ) from None

    def _loras(self, field_name: str, node: yaml.Node) -> tuple[LoraRef, ...]:
        loras: list[LoraRef] = []
        for item_field, item in self._adapter_list(field_name, node):
            entries = self.reader.mapping(item, item_field, frozenset({"path", "scale"}))
            if "path" not in entries:
                raise self.reader.error(item, f"{item_field}.path", "is required")
            path, sha256 = self._adapter_file(f"{item_field}.path", entries["path"][1])
            scale = 1.0
            if "scale" in entries:
                scale_node = entries["scale"][1]
                value = self.reader.scalar(scale_node)
                if not _number(value) or not -_MAX_LORA_SCALE <= value <= _MAX_LORA_SCALE:
                    raise self.reader.error(
                        scale_node,
                        f"{item_field}.scale",
                        f"must be a number between -{_MAX_LORA_SCALE:g} and {_MAX_LORA_SCALE:g}",
                    )
                scale = float(value)
            loras.append(LoraRef(path=path, scale=scale, sha256=sha256))
        return tuple(loras)

    def _embeddings(self, field_name: str, node: yaml.Node) -> tuple[EmbeddingRef, ...]:
        embeddings: list[EmbeddingRef] = []
        tokens: set[str] = set()
        for item_field, item in self._adapter_list(field_name, node):
            entries = self.reader.mapping(item, item_field, frozenset({"path", "token"}))
            for required in ("path", "token"):
                if required not in entries:
                    raise self.reader.error(item, f"{item_field}.{required}", "is required")
            path, sha256 = self._adapter_file(f"{item_field}.path", entries["path"][1])
            token_node = entries["token"][1]
            token = self.reader.scalar(token_node)
            if not isinstance(token, str) or not token.strip() or len(token.split()) != 1:
                raise self.reader.error(
                    token_node, f"{item_field}.token", "must be one word, such as <brand-style>"
                )
            token = token.strip()
            if token in tokens:
                raise self.reader.error(
                    token_node, f"{item_field}.token", f"token {token!r} is used twice"
                )
            tokens.add(token)
            embeddings.append(EmbeddingRef(path=path, token=token, sha256=sha256))
        return tuple(embeddings)
