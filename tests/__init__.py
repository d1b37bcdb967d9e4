"""edgefleet test suite."""
