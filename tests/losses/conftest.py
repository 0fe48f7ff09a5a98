import pytest


@pytest.fixture
def small_gram_blocks(configure):
    """Symmetric-Gram blocks of 4 rows, so that the small inputs of the gram tests span several."""
    configure(gram_block_rows=4)
