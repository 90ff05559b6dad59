"""The worker's Celery app: ``celery -A worker.main worker`` (what ``pixelmill worker`` runs).

Built here rather than in the package, so that importing ``worker`` or any of its modules
builds no app. The app reads its settings from the environment when it is first configured;
its task module (worker.tasks, named in ``include``) registers the render task on it.
"""

import os

# transformers logs, at import, that its image processors would be faster with torchvision
# (which the worker does not use: images reach the pipelines and the scorer as tensors). The
# level must be set before transformers is first imported, which only its variable allows;
# an operator's own TRANSFORMERS_VERBOSITY wins.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from worker.celery_app import create_app

app = create_app()

__all__ = ["app"]
