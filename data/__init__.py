"""Data: shard writing, streaming over fsspec URLs, resumable position, views."""
