"""Pure planning: which entries a rank reads, shared entries and their owners, region
math and resharding boxes, consolidation. No I/O, no collectives."""
