"""sovctl: provision and operate a sovereign AI stack."""

__version__ = "0.1.0"
