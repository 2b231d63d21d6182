"""The served-feature log: sampled records of what each scored transaction was served,
written off the request path to rolling Parquet files (log.py). pyarrow is imported only
once a log starts writing."""

from features.servedlog.log import ROW_GROUP_ROWS, ServedLog, check_directory

__all__ = ["ROW_GROUP_ROWS", "ServedLog", "check_directory"]
