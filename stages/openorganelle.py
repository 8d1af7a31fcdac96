"""DVC stage `openorganelle`: reads params.yaml (sections mirror, download, openorganelle) and writes its output; see emdata.sources.openorganelle."""

from emdata.stage import main

if __name__ == "__main__":
    main("openorganelle")
