"""pneumo: a chest X-ray pneumonia classifier pipeline."""

__version__ = "0.1.0"
