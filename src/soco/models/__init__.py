"""The detector-aligned networks: ResNet-FPN backbone, RoI pooling, box heads and the object encoder."""
