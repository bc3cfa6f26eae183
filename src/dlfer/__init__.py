"""dlfer: a reproducible DVC + MLflow pipeline that reproduces and audits DLFER on FER2013."""

__version__ = "0.1.0"
