"""The properties every public loss shares, one file per property, each run over every loss."""
