"""Unit tests of the pure core (a package, so that test module names may repeat those in integration/)."""
