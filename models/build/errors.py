"""The build's one error type, shared by every stage (sources, export, verification)."""


class BuildError(Exception):
    """A build input is unusable; the message is one line a person can act on."""
