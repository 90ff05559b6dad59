"""The schema of record: runs, catalogue items, jobs and images."""

from db.models import Base, CatalogueItem, Image, Job, JobStatus, Run, RunStatus, SafetyStatus

__all__ = [
    "Base",
    "CatalogueItem",
    "Image",
    "Job",
    "JobStatus",
    "Run",
    "RunStatus",
    "SafetyStatus",
]
