"""Installs the pure-Python package; the optional CUDA extension is added here when it lands."""
from setuptools import setup

setup()
