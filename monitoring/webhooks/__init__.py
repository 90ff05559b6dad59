"""Webhooks: telling the systems around pixelmill that a run finished rendering, that its
review is complete and that an export was written.

The events are rows in the database (db.webhooks), recorded idempotently: the export records
its own as it writes the manifest (review.channels.export); the deliverer finds the other two
by query (events.py), so neither the workers nor the review app do anything more. The
deliverer (delivery.py, ``pixelmill webhooks deliver``) posts each event to every configured
URL as signed JSON (signing.py), retrying with exponential backoff from the outbox
(outbox.py) until the receiver accepts it.
"""
