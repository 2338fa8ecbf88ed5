"""CTFoundation core library: chest-CT input, model preprocessing and models. Never imports slicer or qt."""

__version__ = "0.1.0"
