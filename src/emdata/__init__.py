"""emdata: reproducible acquisition, metadata and block-wise ML access for public 3D EM volumes."""

__version__ = "0.1.0"
