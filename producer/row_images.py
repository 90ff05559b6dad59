"""The catalogue images of templates that start from one (img2img, inpaint, controlnet).

They are staged in a pass of their own over the catalogue, before the jobs are expanded
(:func:`image_addresses` lists what to stage); the expansion then looks each row's staged
image up (:class:`RowImages`), and a missing or failed image makes its item a bad row.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from producer.catalogue import CatalogueError, CatalogueRow, CatalogueSource
from producer.input_images import InputImageError, StagedImage, source_address
from producer.plan import TemplatePlan
from producer.report import Progress
from producer.templates import RenderError

# Address -> the staged image, or why it could not be staged.
StagedImages = dict[str, StagedImage | InputImageError]


def image_base(source: CatalogueSource) -> Path:
    """Where relative image paths in the catalogue start: the catalogue file's folder."""
    path = os.fspath(source.path)
    return Path(os.path.abspath(path)).parent if os.path.isfile(path) else Path()


def image_addresses(
    source: CatalogueSource,
    plans: list[TemplatePlan],
    base: Path,
    progress: Progress | None,
) -> Iterable[str]:
    """The image addresses of the rows the templates apply to (with repeats).

    Rows that are bad for another reason are left to the expansion to report.
    """
    rows = 0
    for row in source.rows():
        rows += 1
        if progress is not None and rows % 100 == 0:
            progress(rows, 0)
        if row.problem is not None:
            continue
        for plan in plans:
            try:
                if not plan.template.applies_to(row.fields, where=""):
                    continue
            except RenderError:
                continue
            for column in plan.conditioning.columns():
                try:
                    yield source_address(row.fields.get(column, ""), base)
                except InputImageError:
                    continue


class RowImages:
    """Each row's staged images, as the expansion asks for them.

    ``staged`` None: nothing was staged (a dry run, or the count before fetching); the
    addresses the rows name are then collected in ``addresses``.
    """

    def __init__(self, label: str, base: Path, staged: StagedImages | None) -> None:
        self.label = label
        self.base = base
        self.staged = staged
        self.addresses: set[str] = set()

    def for_plan(
        self, plan: TemplatePlan, row: CatalogueRow, key: str
    ) -> tuple[StagedImage, StagedImage | None] | None:
        """The row's staged image (and mask image) for ``plan``; None on a dry run.

        Raises a CatalogueError naming the line, the column and the item when an image is
        missing, failed to stage, or does not suit the template's mask.
        """
        conditioning = plan.conditioning
        assert conditioning.image is not None
        image_address, image = self._staged(row, key, conditioning.image)
        mask = None
        if conditioning.mask_column is not None:
            _mask_address, mask = self._staged(row, key, conditioning.mask_column)
        if image is None:
            return None  # a dry run: nothing was fetched, so nothing more to check
        if conditioning.mask_from_alpha and not image.has_alpha:
            raise CatalogueError(
                self.label,
                row.line,
                conditioning.image,
                f"item {key!r}: template {plan.template.name!r}: mask 'alpha' needs an image "
                f"with an alpha channel, and {image_address} has none (mode {image.mode})",
            )
        if mask is not None and (mask.width, mask.height) != (image.width, image.height):
            raise CatalogueError(
                self.label,
                row.line,
                conditioning.mask_column,
                f"item {key!r}: mask {mask.width}x{mask.height} does not match image "
                f"{image.width}x{image.height}",
            )
        return image, mask

    def _staged(self, row: CatalogueRow, key: str, column: str) -> tuple[str, StagedImage | None]:
        try:
            address = source_address(row.fields.get(column, ""), self.base)
        except InputImageError as exc:
            raise CatalogueError(
                self.label, row.line, column, f"item {key!r}: {exc.reason}"
            ) from None
        if self.staged is None:
            self.addresses.add(address)
            return address, None
        result = self.staged.get(address)
        if result is None:
            # image_addresses() yields every address the expansion can reach; this is a bug
            # guard.
            raise CatalogueError(
                self.label, row.line, column, f"item {key!r}: {address}: was not staged"
            )
        if isinstance(result, InputImageError):
            raise CatalogueError(
                self.label, row.line, column, f"item {key!r}: {address}: {result.reason}"
            )
        return address, result
