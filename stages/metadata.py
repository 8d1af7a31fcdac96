"""DVC stage `metadata`: table (CSV, Parquet), METADATA_SUMMARY.md, thumbnails, metrics and plots; see emdata.metadata."""

from emdata.metadata import main

if __name__ == "__main__":
    main()
