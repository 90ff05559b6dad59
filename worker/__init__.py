"""GPU workers: the Celery app (``celery -A worker worker``) and the render task.

Importing this package imports no torch: the model is loaded in each worker process.
"""

from worker.celery_app import create_app

# `celery -A worker` looks for `worker.app`. It reads its settings when first configured.
app = create_app()

__all__ = ["app"]
