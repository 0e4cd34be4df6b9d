"""Pretraining inputs: image folders, the default photo set, object proposals, training views and their batches."""
