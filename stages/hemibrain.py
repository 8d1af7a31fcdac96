"""DVC stage `hemibrain`: reads params.yaml (sections mirror, download, hemibrain) and writes its output; see emdata.sources.hemibrain."""

from emdata.stage import main

if __name__ == "__main__":
    main("hemibrain")
