"""`pixelmill export RUN --channel NAME --to TARGET`: a run's keepers as each sales channel's
files, marked as AI-generated, with a manifest."""

from __future__ import annotations

from pathlib import Path

from cli import common
from cli.common import EXIT_BAD_INPUT, EXIT_FAILED, console, err, fail


def export_to_channels(
    run: str, channels: list[str], presets: Path | None, to: str | None, *, rows_options: bool
) -> None:
    """Everything that can be wrong with the options, the presets, the signing credentials or
    the target is found before any file is written. ``rows_options``: options of the rows
    export (--format, --out, --copy-approved) were given too."""
    if not channels or to is None:
        fail("--channel and --to go together (see --help)", EXIT_BAD_INPUT)
    if rows_options:
        fail(
            "--channel writes files and a manifest: no --format, --out or --copy-approved",
            EXIT_BAD_INPUT,
        )
    from db.runs import find_run
    from pixelmill.storage import storage_from_settings
    from review.channels.export import export_channels
    from review.channels.marking import signer_from_settings
    from review.channels.presets import choose, load_presets
    from review.channels.sinks import open_sink
    from review.export import open_items_left_out

    settings = common.settings()
    presets_path = presets or settings.channel_presets_path
    chosen = choose(load_presets(presets_path), channels, presets_path)
    with common.sessions(settings)() as session:
        found = find_run(session, run)
        if found is None:
            fail(f"no run named {run!r}", EXIT_BAD_INPUT)
        signer = signer_from_settings(settings)
        try:
            sink = open_sink(to, settings)
            result = export_channels(
                session, found, storage_from_settings(settings), chosen, sink, signer
            )
        finally:
            if signer is not None:
                signer.close()
        left_out = open_items_left_out(session, found)
    marking = "XMP and C2PA" if signer is not None else "XMP (no C2PA certificate configured)"
    for name, counts in result.channels.items():
        line = f"{name}: {counts.written} written, {counts.already_there} already there"
        if counts.other_preset:
            line += f" ({counts.other_preset} made by an earlier version of the preset, kept)"
        console.print(line)
    console.print(f"{result.files} files in {result.location}, marked as AI-generated in {marking}")
    console.print(f"manifest: {', '.join(result.manifests)}")
    if left_out:
        err.print(f"{left_out} items not submitted yet were left out (only decided items export)")
    if result.failures:
        for failure in result.failures:
            err.print(f"[red]not exported:[/red] {failure}")
        fail(f"{len(result.failures)} files could not be made", EXIT_FAILED)
