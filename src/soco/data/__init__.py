"""Data: image folders, the default photo set, object proposals and training views."""
