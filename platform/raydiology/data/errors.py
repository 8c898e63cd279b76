"""Errors shared by the corpus readers and writers."""


class BadImage(Exception):
    """A file that cannot become a training image; the message is the quarantine reason."""
