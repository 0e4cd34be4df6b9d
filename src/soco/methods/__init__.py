"""Self-supervised methods, one file each; they share the models, views and engine."""
