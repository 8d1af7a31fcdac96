"""DVC stage `empiar`: reads params.yaml (sections mirror, download, empiar) and writes its output; see emdata.sources.empiar."""

from emdata.stage import main

if __name__ == "__main__":
    main("empiar")
