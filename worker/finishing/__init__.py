"""Finishing keepers after review: upscaling (spandrel) and captions with alt text (BLIP),
on the finishing queue every worker serves, or on demand with ``pixelmill finish``."""
