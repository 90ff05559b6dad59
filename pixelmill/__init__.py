"""pixelmill: nightly bulk image production with Stable Diffusion.

The top-level packages are a map of the system (README, "How the code is layered"):

- ``cli``: the ``pixelmill`` command line, the only code that imports the parts
- the parts, none importing another: ``producer`` (catalogue + templates -> render jobs, the
  dispatcher), ``worker`` (Celery render tasks, diffusers, scores), ``review`` (the web app,
  what is learned from decisions), ``monitoring`` (the exporter, run status)
- ``pixelmill`` (this package, the kernel): what more than one part needs: settings,
  storage, errors, the job identity, the broker's task names
- ``db``: the schema (SQLAlchemy models) and shared queries; ``migrations`` its history
"""

__version__ = "0.1.0"
