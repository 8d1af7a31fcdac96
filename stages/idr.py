"""DVC stage `idr`: reads params.yaml (sections mirror, download, idr) and writes its output; see emdata.sources.idr."""

from emdata.stage import main

if __name__ == "__main__":
    main("idr")
