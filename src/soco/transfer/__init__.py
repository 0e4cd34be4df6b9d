"""Transfer evaluation: fine-tune a torchvision detector on a COCO-format set and measure its COCO AP."""
