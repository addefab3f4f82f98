"""Support code shared by tests/ and benchmarks/ (not shipped in the vesselseg package)."""
