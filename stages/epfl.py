"""DVC stage `epfl`: reads params.yaml (sections mirror, download, epfl) and writes its output; see emdata.sources.epfl."""

from emdata.stage import main

if __name__ == "__main__":
    main("epfl")
