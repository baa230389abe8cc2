"""Helpers shared by test modules. A test module imports what it shares with others from
here (or uses a fixture from a conftest), never from another test module."""
