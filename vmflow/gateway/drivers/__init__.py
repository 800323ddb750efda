"""Drivers that run, snapshot and restore instances; `base.Driver` is the interface."""
