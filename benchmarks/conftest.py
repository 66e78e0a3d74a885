import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from fastmlp.datasets import DEBIAN_FASHION_MNIST, load_directory  # noqa: E402


@pytest.fixture(scope="session")
def fashion_mnist():
    return load_directory(DEBIAN_FASHION_MNIST)
