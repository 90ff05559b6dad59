"""The review app: reviewers work through a run's images one catalogue item at a time, keep
the good ones, and admins export the keepers and read which templates earn them."""
