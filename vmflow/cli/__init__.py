"""The `vmflow` command line."""
