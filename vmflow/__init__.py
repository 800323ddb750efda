"""vmflow: background tasks on dedicated compute instances, orchestrated by Temporal."""

__version__ = "0.1.0"
