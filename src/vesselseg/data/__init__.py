"""Datasets: generators, downloaders and adapters onto one prepared layout."""
