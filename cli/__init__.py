"""The ``pixelmill`` command line, and the one place that puts the parts together: only this
package imports more than one of producer, worker, review and monitoring."""
