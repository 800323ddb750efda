"""The counter program after the imports a typical task needs, for the benchmark."""

import importlib

import fastapi  # noqa: F401
import httpx  # noqa: F401
import pydantic  # noqa: F401
import sqlalchemy  # noqa: F401
import temporalio.client  # noqa: F401

# Importing the counter module runs its loop, so it comes after the other imports.
importlib.import_module("counter")
