"""The supervisor API: platform routes, gateway callbacks and the runners' workload API."""
