"""The test suite; a package so its sub-packages are tests.X and shadow no installed name."""
