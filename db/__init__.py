"""The schema of record: runs, catalogue items, jobs and images."""

from db.models import Base, CatalogueItem, Image, Job, JobStatus, Run, RunStatus, SafetyStatus
from db.ranking import AutoReject, ImageScore, KeeperModel, KeeperPrediction
from db.review_sessions import ReviewSession

__all__ = [
    "AutoReject",
    "ImageScore",
    "KeeperModel",
    "KeeperPrediction",
    "Base",
    "CatalogueItem",
    "Image",
    "Job",
    "JobStatus",
    "Run",
    "ReviewSession",
    "RunStatus",
    "SafetyStatus",
]
