"""The reference compute gateway: an HTTP service whose drivers isolate, snapshot and restore."""
