"""edged: a small language model served offline to kiosks and sensors over MQTT."""

__version__ = "0.1.0"
