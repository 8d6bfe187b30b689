"""The MAL labeler: a ViT image encoder and an attention mask decoder (one concept a file)."""

from mal_cli.modeling.image_encoder import ImageEncoder
from mal_cli.modeling.labeler import LabelerConfig, MaskLabeler
from mal_cli.modeling.mask_decoder import MaskDecoder

__all__ = ["ImageEncoder", "MaskDecoder", "MaskLabeler", "LabelerConfig"]
