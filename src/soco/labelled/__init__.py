"""Labelled downstream sets: COCO reading, DeepForest tiles, composed scenes and Pascal VOC conversion."""
