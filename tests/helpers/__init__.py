"""Test helpers: tiny random models, reference builders, checkpoint writers for each layout."""
