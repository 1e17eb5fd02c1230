"""Deduplication: exact hashes, MinHash signatures, LSH band keys, Ray shuffle and connected components."""
