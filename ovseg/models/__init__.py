"""CLIP dense encoders on top of open_clip, and the text bank (templates -> cached class embeddings)."""

from ovseg.models.clip import CLIPConfig, DenseCLIP
from ovseg.models.text import TEMPLATES, TextBank, get_templates

__all__ = ["CLIPConfig", "DenseCLIP", "TEMPLATES", "TextBank", "get_templates"]
