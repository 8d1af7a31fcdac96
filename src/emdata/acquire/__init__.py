"""Acquisition plumbing shared by every source: params, the run context (the only way to the network), the
download engine, tensorstore over HTTP, URL rewriting and redaction, and atomic file helpers."""
