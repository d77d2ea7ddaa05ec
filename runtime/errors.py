"""The runtime's artifact error, in a module without torch (internvl-artifact check imports it)."""


class ArtifactError(RuntimeError):
    """A problem with an artifact, in one line that says what to do."""
