"""aibackend: one Twisted daemon in front of every AI model a team runs."""

__version__ = "0.1.0"
