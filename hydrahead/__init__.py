"""hydrahead: training classifiers with millions of classes over many GPUs."""

__version__ = "0.1.0"
