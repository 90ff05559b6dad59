"""The finishing task: a submitted review item's id in, its keepers upscaled and captioned.

The review app publishes it (pixelmill.tasks.publish_finishing) on the finishing queue, which
every worker serves beside the render queue. The upscaler and captioner are loaded in the pool
process on its first finishing task and kept for the next ones.
"""

from __future__ import annotations

import logging
import time
from typing import NoReturn

from celery.exceptions import Reject

from pixelmill.errors import BadInputError
from pixelmill.outages import OutageBackoff, RetryBackoff, infrastructure_error
from pixelmill.tasks import FINISH_TASK
from worker.finishing.finish import Finisher
from worker.main import app

log = logging.getLogger(__name__)

_finisher: Finisher | None = None


def get_finisher() -> Finisher:
    """This process's finisher, loaded on first use. A model that cannot be loaded is tried
    again on the next task, so mending the setting's file needs no restart."""
    global _finisher
    if _finisher is None:
        from pixelmill.settings import get_settings
        from worker.finishing.configured import finisher_from_settings

        _finisher = finisher_from_settings(get_settings())
    return _finisher


# A task that could not reach the database or storage goes back to the broker after this
# process's pause (longer while the outage lasts): its keepers are finished later, not lost.
_outages = OutageBackoff(RetryBackoff(base=1.0, cap=30.0))


@app.task(name=FINISH_TASK)
def finish_item_task(review_item_id: int) -> str:
    try:
        report = get_finisher().finish_item(review_item_id)
    except BadInputError as exc:
        # A bad model file or setting: every retry would fail the same way. The message is
        # dropped; `pixelmill finish RUN` finishes the run once the setting is mended.
        log.error("review item %s not finished: %s", review_item_id, exc)
        return f"failed: {exc}"
    except Exception as exc:
        outage = infrastructure_error(exc)
        if outage is None:
            raise
        _give_message_back(review_item_id, outage)
    _outages.succeeded()
    for failure in report.failures:
        log.warning("review item %s: %s", review_item_id, failure)
    log.info("review item %s finished: %s", review_item_id, report.summary())
    return report.summary()


def _give_message_back(review_item_id: int, outage: Exception) -> NoReturn:
    pause = _outages.failed()
    log.warning(
        "review item %s: %s; its finishing goes back to the broker in %.1f s",
        review_item_id,
        outage,
        pause,
    )
    time.sleep(pause)
    raise Reject(str(outage), requeue=True)
