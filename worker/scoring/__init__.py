"""Scores at render time: CLIP embedding, prompt-image and image-image similarity, and an
aesthetic rating, computed on the worker's device before the PNG leaves."""
