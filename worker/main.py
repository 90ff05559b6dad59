"""The worker's Celery app: ``celery -A worker.main worker`` (what ``pixelmill worker`` runs).

Built here rather than in the package, so that importing ``worker`` or any of its modules
builds no app. The app reads its settings from the environment when it is first configured;
its task module (worker.tasks, named in ``include``) registers the render task on it.
"""

from worker.celery_app import create_app

app = create_app()

__all__ = ["app"]
