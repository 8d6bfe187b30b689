"""mal — Mask Auto-Labeler: train a ViT labeler from boxes alone, then turn every box into a mask."""

__version__ = "0.1.0"
