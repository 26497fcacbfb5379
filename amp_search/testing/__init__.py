"""Test support shipped with the package: real-model fetching, tiny model builders, suites."""
