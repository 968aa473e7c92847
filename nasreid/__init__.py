"""nasreid: neural architecture search for person re-identification."""
__version__ = "0.1.0"
