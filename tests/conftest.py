"""Shared fixtures. `corpus`: the real-speech corpus, built once (about 10 s, needs apt) if missing."""

import pytest

from voxport.corpus import Corpus, build_corpus, load_corpus


@pytest.fixture(scope="session")
def corpus() -> Corpus:
    return load_corpus(build_corpus())
