"""DVC stage `metadata`: the consolidated table, METADATA_SUMMARY.md, metrics and plots; see emdata.metadata."""

from emdata.metadata import main

if __name__ == "__main__":
    main()
