"""What is on disk: the zip directory, the restricted unpickler, the index of a rank
file, the index file, the commit manifest, DTensor entries as plain data."""
