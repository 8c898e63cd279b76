"""Data: corpus format v1, built-in phantoms and image-folder ingest."""

from raydiology.data.corpus import (
    SCHEMA_VERSION,
    CorpusError,
    CorpusWriter,
    Manifest,
    ShardInfo,
    decode_pixels,
    manifest_hash,
    read_manifest,
    read_rows,
    shard_paths,
    verify_corpus,
)
from raydiology.data.ingest import IngestSummary, ingest_images
from raydiology.data.phantom import FINDINGS, PhantomCase, make_phantom, write_phantom_corpus

__all__ = [
    "FINDINGS",
    "SCHEMA_VERSION",
    "CorpusError",
    "CorpusWriter",
    "IngestSummary",
    "Manifest",
    "PhantomCase",
    "ShardInfo",
    "decode_pixels",
    "ingest_images",
    "make_phantom",
    "manifest_hash",
    "read_manifest",
    "read_rows",
    "shard_paths",
    "verify_corpus",
    "write_phantom_corpus",
]
