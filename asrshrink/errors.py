"""Errors a user can act on: the CLI prints them as one line and exits with code 2."""


class AsrshrinkError(Exception):
    """A problem with the user's input (file, option, data), stated with the fix."""


class CheckpointError(AsrshrinkError):
    """A model file that cannot be loaded safely or exactly."""


class DataError(AsrshrinkError):
    """Audio, transcripts or manifests that cannot be read."""
