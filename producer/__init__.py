"""Producer side of pixelmill: catalogue CSV + YAML prompt templates -> render jobs."""
