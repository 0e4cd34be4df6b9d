"""The `soco` command line."""
