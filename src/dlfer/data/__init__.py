"""FER2013 from a source to training arrays: locating and reading a copy (sources), the great-expectations
suite and the data-quality audit (validation), the official or the paper's splits (splits) and the paper's
class-balancing augmentation (augment)."""
