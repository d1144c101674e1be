"""The package version, in a leaf module: state files record it without importing the package."""
__version__ = "0.1.0"
