"""The worker's own errors, on the kernel's branches (pixelmill.errors).

A job's outcome follows the branch of the error that ended it: a BadInputError (the job's own
inputs: a missing model folder, an unknown scheduler, a bad adapter file or input image) fails
it at once, since another attempt would fail the same way; any other error gives it back for
another attempt. A third-party error that means bad input is turned into a BadInputError where
it is caught, by the code that knows what it means.
"""

from __future__ import annotations

from pixelmill.errors import BadInputError, PixelmillError


class JobInputError(BadInputError):
    """A job's own input that cannot be rendered, found by a check that raised another kind of
    error (a parameter check's ValueError, diffusers' error for a model it cannot load,
    pydantic's for the job's options). That error is the ``__cause__``: the job's error names
    its kind."""


class LeaseLostError(PixelmillError):
    """Another worker took the job over: this one stops and records nothing more."""
