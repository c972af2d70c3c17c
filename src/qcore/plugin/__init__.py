"""The plugin contract."""
