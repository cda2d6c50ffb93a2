"""The one error type for a model that cannot be loaded: shown to users as a single line."""


class ModelLoadError(ValueError):
    """A model file or directory is missing, malformed or unsupported; the message names it."""
