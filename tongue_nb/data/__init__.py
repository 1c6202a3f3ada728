"""Data: task schemas and labels, splits, image decoding and cropping, the decode-once cache, batch loading,
the synthetic dataset and importers of public datasets."""
