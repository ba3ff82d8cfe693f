"""What is on disk: the manifest and its sources, Arrow shard stores, the live views, RunDir and the typed records."""
