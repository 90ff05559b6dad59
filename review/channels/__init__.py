"""Exporting keepers to sales channels: presets per channel (presets), each image's
derivative (render), its AI-generated marking in XMP and C2PA (marking), the targets
(sinks) and the run export with its manifest (export)."""
