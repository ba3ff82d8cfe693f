"""Video decoding, torch-free: probe, decode (decord / PyAV), the decode pool, frames, motion maps, per-clip failures."""
