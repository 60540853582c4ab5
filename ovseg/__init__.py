"""ovseg: open-vocabulary semantic segmentation benchmark framework."""

__version__ = "0.1.0"
