"""The metadata of every dataset output: typed records, statistics, thumbnails, table, summary, DVC metrics/plots."""

from emdata.metadata.build import (
    INTENSITY_METRICS, METRICS, PARQUET, PLOT_TEMPLATE, PLOTS, SUMMARY, TABLE, THUMBNAILS, build_metadata, collect,
    histogram_frames, main, table,
)
from emdata.metadata.records import ArrayRecord, MetadataParams, RunFacts, SourceFacts, output_records, tree_sha256
from emdata.metadata.stats import Histogram, IntensityStats, intensity_stats
from emdata.metadata.thumbnails import Thumbnail, write_thumbnails

__all__ = [
    "INTENSITY_METRICS", "METRICS", "PARQUET", "PLOTS", "PLOT_TEMPLATE", "SUMMARY", "TABLE", "THUMBNAILS",
    "ArrayRecord", "Histogram", "IntensityStats", "MetadataParams", "RunFacts", "SourceFacts", "Thumbnail",
    "build_metadata", "collect", "histogram_frames", "intensity_stats", "main", "output_records", "table",
    "tree_sha256", "write_thumbnails",
]
