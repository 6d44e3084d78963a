"""Tests of the cloud hub."""
