"""The command-line tools and research code (`python -m hifloat4 ...`), apart from the library.

They import the library; the library never imports them.
"""
