"""The schema of record: runs, catalogue items, jobs and images."""

from db.finishing import CatalogueFill, ImageCaption, UpscaledImage
from db.models import Base, CatalogueItem, Image, Job, JobStatus, Run, RunStatus, SafetyStatus
from db.ranking import AutoReject, ImageScore, KeeperModel, KeeperPrediction
from db.review_sessions import ReviewSession
from db.webhooks import WebhookDelivery, WebhookEvent, WebhookEventType

__all__ = [
    "AutoReject",
    "Base",
    "CatalogueFill",
    "CatalogueItem",
    "Image",
    "ImageCaption",
    "ImageScore",
    "Job",
    "JobStatus",
    "KeeperModel",
    "KeeperPrediction",
    "ReviewSession",
    "Run",
    "RunStatus",
    "SafetyStatus",
    "UpscaledImage",
    "WebhookDelivery",
    "WebhookEvent",
    "WebhookEventType",
]
