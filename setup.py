"""Kept for tools that still call `python setup.py`; the metadata is in setup.cfg."""

from setuptools import setup

setup()
