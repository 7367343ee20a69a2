"""The bottom layer: pure helpers every other layer uses (region math and placements, CRC32,
file-to-file copies, rank ranges). Imports nothing else of dist_restore."""
