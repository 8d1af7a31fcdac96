"""Parsers of the file and metadata formats the sources serve (Neuroglancer precomputed ``info``, ...)."""
