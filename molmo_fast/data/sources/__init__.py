"""Shard sources: `pixmo` and `academic` converters of Hugging Face datasets, `synthetic` generators, and the
`registry` of all of them by name. Kept import-free so that `sources.synthetic` does not pull in `datasets`."""
