"""Command-line tools beside main.py and generate.py, run as `python -m scripts.NAME`."""
