"""Tests of the regional relay."""
