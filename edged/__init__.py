"""edged: run a small medical language model on the device, next to the patient."""

__version__ = "0.1.0"
