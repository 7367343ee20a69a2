"""Moving bytes: reading records into tensors (mmap, preadv, pinned buffers), CRC32,
resharding copies, vectored copies, memory files. Nothing here plans or talks to other ranks."""
