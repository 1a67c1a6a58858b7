"""Data, schedule, seeding, checkpoints, metrics and plotting helpers."""
