"""pixelmill: nightly bulk image production with Stable Diffusion.

The top-level packages are a map of the system:

- ``producer``: catalogue + templates -> render jobs in the database, and the dispatcher
- ``worker``: the Celery app and the render task (diffusers on a GPU)
- ``db``: the schema (SQLAlchemy models) and sessions; ``migrations`` holds its history
- ``pixelmill``: what they share: settings, storage, the ``pixelmill`` command line
"""

__version__ = "0.1.0"
