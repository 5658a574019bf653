"""attnkit: the attention family for transformers, one fast API."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("attnkit")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
