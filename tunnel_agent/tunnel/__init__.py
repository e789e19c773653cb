"""The tunnel: the tunnelOpen contract, its validation, connecting both ends and pumping bytes."""
