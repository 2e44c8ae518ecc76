"""ImageUnlock: unlock encrypted Docker image archives, as a library, a CLI and a kopf operator."""

__version__ = "0.1.0"
