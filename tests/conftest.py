"""Fixture modules: each area owns one file under tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.data",
    "tests.fixtures.models",
    "tests.fixtures.broker",
    "tests.fixtures.cryceleb",
    "tests.fixtures.silent_broker",
    "tests.fixtures.cli",
    "tests.fixtures.pulse",
]
