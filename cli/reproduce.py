"""`pixelmill reproduce IMAGE`: re-render one image from its record and compare the pixels."""

from __future__ import annotations

from typing import Annotated

import typer

from cli import common
from cli.common import EXIT_FAILED, console


def reproduce(
    image: Annotated[str, typer.Argument(help="The image's id or storage key.")],
) -> None:
    """Re-render IMAGE from its record alone (job, seed, batch, model, fast path) on this
    machine and say whether its pixels are identical to the stored PNG, or by how much they
    differ. Nothing is written. Exits 1 when the pixels differ."""
    from worker.reproduce import find_image, reproduce_image
    from worker.tasks import build_runtime

    settings = common.settings()
    runtime = build_runtime(settings, scoring=False)
    # The CLI's sessions (no pool): the command's one connection closes with its session.
    runtime.sessions = common.sessions(settings)
    with runtime.sessions() as session:
        found = find_image(session, image)
        console.print(
            f"image {found.id} ({found.storage_key}): seed {found.seed}, "
            f"re-rendering its batch of {len(found.batch_seeds or [found.seed])}"
        )
        result = reproduce_image(runtime, session, found)
    for change in result.changes:
        console.print(f"  differs from the record: {change}")
    if result.identical:
        console.print("pixels identical")
        return
    share = result.differing_values / result.total_values
    console.print(
        f"pixels differ: largest difference {result.max_difference} of 255, in "
        f"{result.differing_values:,} of {result.total_values:,} values ({share:.2%})"
    )
    raise typer.Exit(EXIT_FAILED)
